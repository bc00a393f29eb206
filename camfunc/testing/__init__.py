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
    TokenNet as TokenNet,
    cases as cases,
    inputs as inputs,
    models as models,
    randomised as randomised,
    targets as targets,
    token_models as token_models,
)
from camfunc.testing._matrix import (
    Cell as Cell,
    Matrix as Matrix,
    property_matrix as property_matrix,
)
from camfunc.testing._properties import (
    CASES_FOR as CASES_FOR,
    PROPERTIES as PROPERTIES,
    batch_independent as batch_independent,
    channel_permutation_invariant as channel_permutation_invariant,
    class_axis_consistent as class_axis_consistent,
    compile_equivalent as compile_equivalent,
    deterministic as deterministic,
    implementation_invariant as implementation_invariant,
    logit_scale_invariant as logit_scale_invariant,
    randomisation_sensitive as randomisation_sensitive,
    translation_equivariant as translation_equivariant,
    unit_range as unit_range,
)

__all__ = ["CASES_FOR", "PROPERTIES", "Case", "Cell", "KitNet", "Matrix", "TokenNet",
           "batch_independent", "cases", "channel_permutation_invariant", "class_axis_consistent",
           "compile_equivalent", "deterministic", "implementation_invariant", "inputs",
           "logit_scale_invariant", "models", "property_matrix", "randomisation_sensitive",
           "randomised", "targets", "token_models", "translation_equivariant",
           "unit_range"]
