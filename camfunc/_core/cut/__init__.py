"""Cutting a model: capture its graph, mark layer outputs, build the stages.

A private package; its modules depend only on torch and on each other:
``lock`` (tracing excludes calls), ``capture`` (torch.fx or torch.export into
one graph with the layers' outputs marked), ``partition`` (which stage each
node runs in, mutations included) and ``stages`` (one GraphModule per stage),
``evidence`` (what the graph says about a cut's feature axis).
"""
