"""Property-based tests of CAM methods: hypothesis strategies that draw whole test cases
(a model, its split, an input, the classes), and explanation properties that raise a
readable ``AssertionError`` with the counterexample. Needs hypothesis
(``pip install 'camfunc[testing]'``).

Plain pytest and hypothesis; a failure shrinks to a minimal case and prints how to replay it:

    from hypothesis import given
    import camfunc.testing

    @given(camfunc.testing.cases())
    def test_my_cam(case):
        camfunc.testing.PROPERTIES["batch_independent"](my_cam, case)
"""

from camfunc.testing._cases import (
    Case as Case,
    KitNet as KitNet,
    cases as cases,
    inputs as inputs,
    models as models,
    targets as targets,
)
from camfunc.testing._matrix import (
    Cell as Cell,
    Matrix as Matrix,
    property_matrix as property_matrix,
)
from camfunc.testing._properties import (
    PROPERTIES as PROPERTIES,
    batch_independent as batch_independent,
    class_axis_consistent as class_axis_consistent,
    compile_equivalent as compile_equivalent,
    deterministic as deterministic,
    logit_scale_invariant as logit_scale_invariant,
    unit_range as unit_range,
)

__all__ = ["PROPERTIES", "Case", "Cell", "KitNet", "Matrix", "property_matrix", "batch_independent", "cases", "class_axis_consistent",
           "compile_equivalent", "deterministic", "inputs", "logit_scale_invariant", "models",
           "targets", "unit_range"]
