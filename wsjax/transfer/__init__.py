"""wsjax.transfer: permutations of hidden units and weight matching.

    spec = PermutationSpec.for_model("resnet20", variables)     # params + batch_stats
    perms, info = weight_matching(spec, params_a, params_b, key=jax.random.key(0))
    b_matched = apply_permutation(spec, perms, variables_b)     # same function as b

Specs are data beside the models (``wsjax.models.permutation_spec``): one
entry per axis of every leaf, a permutation's name, ``Flattened`` (a
flattened feature map whose channels are permuted) or None. Convention:
``P(w)[axis] = w.take(perm, axis)`` (Git Re-Basin's). ``weight_matching`` is
Git Re-Basin's coordinate descent (Ainsworth et al., 2023), seeded, with cost
matrices built on the device, for one pair of trees or a sum over pairs
(``stack_pairs``; Chijiwa 2024's gradient matching).
"""
from wsjax.models.permutation_specs import Flattened
from wsjax.transfer.permutation import (
    PermutationSpec,
    apply_permutation,
    compose,
    identity_perms,
    invert,
    random_perms,
)
from wsjax.transfer.weight_matching import (
    MatchInfo,
    cost_matrix,
    is_parameter,
    matching_objective,
    stack_pairs,
    weight_matching,
)

__all__ = [
    "Flattened", "MatchInfo", "PermutationSpec", "apply_permutation", "compose",
    "cost_matrix", "identity_perms", "invert", "is_parameter", "matching_objective",
    "random_perms", "stack_pairs", "weight_matching",
]
