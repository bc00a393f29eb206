"""Dataset-scale runs: CAM methods over a whole dataset, in resumable shards, under torchrun.

``run(data, out, ...)`` does the work; ``read_maps(out, method)`` and
``read_shard(path)`` read the results back. See :func:`run` for the sharding,
resume and distributed rules.
"""

from ._job import RunResult as RunResult
from ._job import run as run
from ._shards import read_maps as read_maps
from ._shards import read_shard as read_shard

__all__ = ["RunResult", "read_maps", "read_shard", "run"]
