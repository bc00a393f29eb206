"""Cutting a model: capture its graph, mark layer outputs, build the stages.

A private package; its modules depend on torch, on each other, and on the core's
``split`` and ``validate``: ``lock`` (tracing excludes calls), ``capture`` (torch.fx
or torch.export into one graph with the layers' outputs marked, and the inputs an
export holds for), ``partition`` (which stage each node runs in, mutations included,
and one GraphModule per stage), ``evidence`` (what the graph says about a cut's
feature axis), ``captures`` (a split's captures kept valid for the input and the
model as it is now), ``cache`` (prepared copies for the whole-model methods).
"""
