"""Suite-wide settings: float64 available, strict dtype promotion, shared helpers.

Shapes and dtypes of every annotated function in `ops` and `sympow` are checked by
jaxtyping + beartype through the `--jaxtyping-packages` option in pyproject.toml."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


def relative_error(actual, expected, floor: float = 1e-3) -> float:
    """max |actual - expected| / max |expected|: one number per array, scale-free.

    The scale is floored (inputs in these tests are of unit size): a quantity that is zero in
    exact arithmetic, such as d y_1 / d q_1 = 0 because y_1 = v_1, has only round-off to compare."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), floor))


def attention_inputs(batch, seq, heads, dim, *, gamma=None, dtype=jnp.float64, seed=0, dim_v=None):
    """Random q, k, v and log gates with gamma drawn around the given strength (None: no gate).

    q and k lean towards one direction per head. Feature forms get (q . k)^p as a sum of terms
    as large as (|q||k|)^p, so a row whose keys are all nearly orthogonal to its query loses
    digits in any of them (measured: 2e-6 relative in d y / d q at seq 1, p 4, cosine 0.023).
    That is the conditioning of the row, which no algorithm fixes; an indexing or gating
    mistake shows as an O(1) error, which these inputs still catch at 1e-9."""
    keys = jax.random.split(jax.random.key(seed), 5)
    direction = jax.random.normal(keys[4], (heads, dim), dtype)
    q, k = (direction + 0.5 * jax.random.normal(key, (batch, seq, heads, dim), dtype) for key in keys[:2])
    v = jax.random.normal(keys[2], (batch, seq, heads, dim_v or dim), dtype)
    if gamma is None:
        return q, k, v, None
    # Spread each token's gamma over [gamma^2, gamma^0.5] (clipped below 1) so gates vary per token.
    exponent = jax.random.uniform(keys[3], (batch, seq, heads), dtype, 0.5, 2.0)
    return q, k, v, exponent * jnp.log(jnp.asarray(gamma, dtype))


def sine_loss(y):
    """sum sin(3 y), in at least float32 (bf16 outputs are cast up): its gradient in y differs
    from entry to entry (that of sum y would give every row the same incoming gradient)."""
    return jnp.sum(jnp.sin(3 * (y if jnp.finfo(y.dtype).bits >= 32 else y.astype(jnp.float32))))


def output_and_gradients(attend, *args):
    """y = attend(*args) and the gradient of sine_loss(y) in each argument."""
    y, pullback = jax.vjp(attend, *args)
    return (y, *pullback(jax.grad(sine_loss)(y)))


# Float32 round-off of unit-size inputs, as relative_error measures it with its scale floored
# at 1: ~17 float32 ulps.
FLOAT32_ROUNDOFF = 2e-6


def within_kernel_rule(kernel, plain, expected) -> bool:
    """A float32 Triton kernel's result is within twice the error of the pure-JAX form's in
    float32 (both against float64), or within float32 round-off.

    In the interpreter the kernels' matmuls are numpy's, whose float32 rounding depends on the
    machine's BLAS kernel: on the CI machine (AMD EPYC, OPENBLAS_CORETYPE=Haswell) the p = 4 flash
    kernels' dq at dim 64 is off by 1.4e-6 against the pure-JAX form's 5.7e-7 (9.5e-7 with
    OpenBLAS's own choice of kernel), and a gradient that is 0 in exact arithmetic (d y_1 / d q_1,
    as y_1 = v_1) comes out as 1.7e-7: dy . v_1 - dy . y_1, rounded two ways. So errors are
    measured against a scale of at least 1 (the inputs' size, and that of the terms whose
    round-off a zero gradient shows), and FLOAT32_ROUNDOFF always passes."""
    return relative_error(kernel, expected, floor=1.0) <= max(
        2 * relative_error(plain, expected, floor=1.0), FLOAT32_ROUNDOFF
    )


# The fast tier (`bash scripts/test.sh --fast`, `pytest -m fast`): one or two tests of each kind,
# about a minute on 2 cores, for use while changing code; the whole suite runs before a commit
# and in CI. A name without brackets takes every parameter of that test.
FAST = (
    "test_naive.py::test_the_oracle_imports_nothing_it_checks",
    "test_naive.py::test_attention_form_matches_a_loop_over_positions",
    "test_forms.py::test_forms_agree_with_the_oracle[7-2-0.5-attention]",
    "test_forms.py::test_forms_agree_with_the_oracle[7-2-0.5-recurrent]",
    "test_forms.py::test_forms_agree_with_the_oracle[7-2-0.5-chunked]",
    "test_stages.py::test_state_scan_stage[True]",
    "test_stages.py::test_chunk_outputs_stage[2-0.6]",
    "test_state.py::test_outputs_before_p_ignore_every_later_input[attention-0.8]",
    "test_groups.py::test_grouped_heads_equal_repeated_heads_in_every_form[2-chunked]",
    "test_groups.py::test_bad_groupings_are_refused",
    "test_exact.py::test_two_sum_and_two_product_are_exact",
    "test_errors.py::test_odd_or_non_positive_power",
    "test_errors.py::test_mismatched_shapes_or_dtypes",
    "test_errors.py::test_states_too_large_to_hold_are_refused_at_once_naming_D",
    "test_triton.py::test_attention_kernel_forward_matches_float64[1-16-16-2-0.9]",
    "test_triton.py::test_chunked_kernels_compile_for_sm90[64-8-bf16-state_scan]",
    "test_triton.py::test_dce_rule_is_called_as_this_jax_calls_rules",
    "test_triton_stages.py::test_the_tiled_layout_holds_the_exact_state[32]",
    "test_triton_stages.py::test_state_stage[0.6-16]",
    "test_benchmark.py::test_import_ops_brings_only_the_operator",
    "test_conformal.py::test_induced_map_is_orthogonal",
    "test_rotary.py::test_angle_gradient_is_theta_times_cumulative_count",
    "test_transformer.py::test_variant_parameters",
    "test_transformer.py::test_the_gate_starts_at_the_gamma_asked_for",
    "test_decode.py::test_learned_rotary_angles_after_65536_decode_steps_match_float64",
    "test_decode.py::test_a_ragged_batch_prefills_and_decodes_as_each_row_alone[conformal-grouped]",
    "test_data.py::test_windows_go_column_by_column_with_end_of_text_first",
    "test_data.py::test_each_process_reads_its_own_share",
    "test_recall.py::test_sequences_depend_only_on_seed_split_and_position",
    "test_run_folder.py::test_one_writer_per_run_folder_and_a_dead_holder_is_taken_over",
    "test_train.py::test_the_training_step_never_calls_back_to_the_host",
    "test_sample.py::test_sample_refuses_bad_requests",
    "test_experiments.py::test_accuracy_and_loss_over_a_span_weigh_positions_by_their_targets",
)


@pytest.hookimpl(tryfirst=True)  # before `-m fast` selects by the marks
def pytest_collection_modifyitems(config, items):
    """Mark the fast tier; a name in FAST that no collected test has is an error, so that the
    tier cannot lose a test to a rename (checked where whole files are collected)."""
    collected = {item.nodeid.removeprefix("tests/") for item in items}
    collected |= {name.split("[")[0] for name in collected}
    for item in items:
        name = item.nodeid.removeprefix("tests/")
        if name in FAST or name.split("[")[0] in FAST:
            item.add_marker(pytest.mark.fast)
    files = {name.split("::")[0] for name in collected}
    missing = [name for name in FAST if name.split("::")[0] in files and name not in collected]
    selected_by_name = config.option.keyword or any("::" in arg for arg in config.args)
    if missing and not selected_by_name:
        raise pytest.UsageError(f"tests/conftest.py FAST names tests that do not exist: {missing}")
