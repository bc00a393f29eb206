"""The embedded demo model and its procedurally generated data.

``scenes`` draws images of coloured shapes with distractors and their exact
object masks; ``shapesnet`` is a small CNN trained on them, shipped with the
package (under 2 MB), so CAMs can be checked against ground truth offline.
``python -m camfunc.zoo.train`` regenerates the weights.
"""

from ._net import LAYER as LAYER
from ._net import WEIGHTS_FILE as WEIGHTS_FILE
from ._net import ShapesNet as ShapesNet
from ._net import shapesnet as shapesnet
from ._scenes import CLASSES as CLASSES
from ._scenes import IMAGE_SIZE as IMAGE_SIZE
from ._scenes import Scenes as Scenes
from ._scenes import scenes as scenes

__all__ = ["CLASSES", "IMAGE_SIZE", "LAYER", "Scenes", "ShapesNet", "WEIGHTS_FILE", "scenes",
           "shapesnet"]
