"""The embedded demo model and its procedurally generated data.

``scenes`` draws images of coloured shapes with distractors and their exact
object masks; ``shapesnet`` is a small CNN trained on them, shipped with the
package (under 2 MB), so CAMs can be checked against ground truth offline.
``python -m camfunc.zoo.train`` regenerates the weights.
"""

from camfunc.zoo._net import (
           LAYER as LAYER,
           WEIGHTS_FILE as WEIGHTS_FILE,
           ShapesNet as ShapesNet,
           shapesnet as shapesnet,
)
from camfunc.zoo._scenes import (
           CLASSES as CLASSES,
           DECOY_COLOURS as DECOY_COLOURS,
           IMAGE_SIZE as IMAGE_SIZE,
           Scenes as Scenes,
           scenes as scenes,
)

__all__ = [
           "CLASSES",
           "DECOY_COLOURS",
           "IMAGE_SIZE",
           "LAYER",
           "WEIGHTS_FILE",
           "Scenes",
           "ShapesNet",
           "scenes",
           "shapesnet",
]
