"""Fixed and learned rotary: relative positions only, exact angles at 65536, zero weights = fixed."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import attention_inputs, relative_error

import ops
from sympow.rotary import LearnedRotary, fixed_angles, frequencies_in_turns, rotate, rotation_angles


def angle_gap(a, b):
    """Distance between two angles on the circle."""
    return np.abs(np.angle(np.exp(1j * (np.asarray(a, np.float64) - np.asarray(b, np.float64)))))


def float64_angles(beta, head_dim, length):
    """theta_k sum beta in float64, from the same float32 beta and frequencies."""
    turns = frequencies_in_turns(head_dim, length).astype(np.float64)
    return 2 * np.pi * np.cumsum(np.asarray(beta, np.float64), axis=1)[..., None] * turns


def test_paper_frequencies():
    turns = frequencies_in_turns(64, 65536)
    np.testing.assert_allclose(2 * np.pi * turns, 2 * np.pi / 65536.0 ** (2 * np.arange(32) / 64), rtol=1e-7)


def test_learned_angles_at_65536_match_float64():
    beta = jax.random.uniform(jax.random.key(0), (1, 65536, 2), jnp.float32, 0.0, 2.0)
    angles = rotation_angles(beta, 64, 65536)
    assert angles.dtype == jnp.float32
    assert angle_gap(angles, float64_angles(beta, 64, 65536)).max() < 1e-4
    # The check has teeth: a plain float32 running sum is off by far more.
    plain = 2 * np.pi * jnp.cumsum(beta, axis=1)[..., None] * jnp.asarray(frequencies_in_turns(64, 65536))
    assert angle_gap(plain, float64_angles(beta, 64, 65536)).max() > 1e-2


def test_fixed_angles_are_position_times_theta():
    angles = fixed_angles(1, 65536, 1, 64, 65536)
    positions = np.arange(1, 65537, dtype=np.float64)[None, :, None, None]
    expected = 2 * np.pi * positions * frequencies_in_turns(64, 65536).astype(np.float64)
    assert angle_gap(angles, expected).max() < 1e-4


def test_angle_gradient_is_theta_times_cumulative_count():
    beta = jnp.ones((1, 6, 1), jnp.float32)
    grad = jax.grad(lambda b: rotation_angles(b, 8, 65536)[0, 3, 0, 1])(beta)
    theta_1 = 2 * np.pi * frequencies_in_turns(8, 65536)[1]
    np.testing.assert_allclose(grad[0, :, 0], [theta_1] * 4 + [0, 0], rtol=1e-6)


def test_outputs_depend_on_relative_position_only():
    """Shifting every angle of a frequency by the same amount leaves the weights unchanged."""
    q, k, v, log_g = attention_inputs(1, 40, 2, 8, gamma=0.9)
    beta = jax.random.uniform(jax.random.key(1), (1, 40, 2), jnp.float32, 0.0, 2.0)
    angles = rotation_angles(beta, 8, 65536).astype(jnp.float64)
    shift = jax.random.uniform(jax.random.key(2), (4,), jnp.float64, 0, 2 * np.pi)

    def attend(angles):
        return ops.sympow_attention(rotate(q, angles), rotate(k, angles), v, log_g, impl="attention")

    assert relative_error(attend(angles + shift), attend(angles)) < 1e-12
    assert relative_error(attend(angles * 1.5), attend(angles)) > 1e-3  # not a test that cannot fail


def test_rotation_preserves_norms_and_pairs_dims_k_and_k_plus_half():
    x = jax.random.normal(jax.random.key(3), (1, 5, 1, 8), jnp.float64)
    angles = jnp.full((1, 5, 1, 4), np.pi / 2, jnp.float64)
    rotated = rotate(x, angles)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(rotated[..., :4], -x[..., 4:], atol=1e-12)
    np.testing.assert_allclose(rotated[..., 4:], x[..., :4], atol=1e-12)


def test_learned_rotary_with_zero_weights_is_fixed_rotary():
    rotary = LearnedRotary(16, 2)
    x = jax.random.normal(jax.random.key(4), (2, 300, 16), jnp.float32)
    np.testing.assert_array_equal(rotary(x), 1.0)
    np.testing.assert_array_equal(rotation_angles(rotary(x), 8, 65536), fixed_angles(2, 300, 2, 8, 65536))
