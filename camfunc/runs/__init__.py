"""Dataset-scale runs: CAM methods over a whole dataset, in resumable shards, under torchrun.

``run(data, out, ...)`` does the work; ``read_maps(out, method)`` and
``read_shard(path)`` read the results back; ``open_data(data, size)`` opens a dataset as
``run`` reads it. See :func:`run` for the sharding,
resume and distributed rules.
"""

from camfunc.runs._dataset import open_data as open_data
from camfunc.runs._job import RunResult as RunResult, run as run
from camfunc.runs._shards import read_maps as read_maps, read_shard as read_shard

__all__ = ["RunResult", "open_data", "read_maps", "read_shard", "run"]
