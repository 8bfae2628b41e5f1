"""The conformal state view: a conformal-sympow head is a recurrence whose state, kept in the
frame of the current token, is scaled by the gate and rotated in phi-space at every step.

With A_t the rotary rotation at t and P(A) the map with phi(A x) = P(A) phi(x) (orthogonal,
since (A x . A y)^p = (x . y)^p), the state S'_t = sum_j e^{G_t - G_j} P(A_t)^T P(A_j) phi(r k_j) v_j^T
evolves as S'_t = gamma_t P(A_t^T A_{t-1}) S'_{t-1} + phi(r k_t) v_t^T and is read with the
unrotated query: y_t = phi(r q_t)^T S'_t / phi(r q_t)^T z'_t."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from conftest import attention_inputs, relative_error

import ops
from sympow.rotary import rotate, rotation_angles


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """The rotary rotation of one token: pair (k, k + d/2) turned by angles[k]."""
    half = len(angles)
    cos, sin = np.diag(np.cos(angles)), np.diag(np.sin(angles))
    return np.block([[cos, -sin], [sin, cos]]) if half else np.eye(0)


def induced_map(rotation: np.ndarray, p: int) -> np.ndarray:
    """P with phi(R x) = P phi(x), solved from enough random x (exact: phi spans its space)."""
    dim = rotation.shape[0]
    xs = np.random.default_rng(0).normal(size=(3 * math.comb(dim + p - 1, p), dim))
    features = np.asarray(ops.sympow_embedding(jnp.asarray(xs), p))
    rotated_features = np.asarray(ops.sympow_embedding(jnp.asarray(xs @ rotation.T), p))
    solution, *_ = np.linalg.lstsq(features, rotated_features, rcond=None)
    return solution.T


def test_scaled_and_rotated_state_recurrence_equals_attention_form():
    seq, dim, p = 12, 4, 2
    q, k, v, log_g = attention_inputs(1, seq, 1, dim, gamma=0.8)
    beta = jax.random.uniform(jax.random.key(5), (1, seq, 1), jnp.float32, 0.0, 2.0)
    angles = np.asarray(rotation_angles(beta, dim, 65536), np.float64)[0, :, 0]  # [seq, dim/2]
    expected = ops.sympow_attention(
        rotate(q, jnp.asarray(angles)[None, :, None]),
        rotate(k, jnp.asarray(angles)[None, :, None]),
        v,
        log_g,
        p=p,
        impl="attention",
    )

    root_scale = (1 / math.sqrt(dim)) ** 0.5
    phi = lambda x: np.asarray(ops.sympow_embedding(jnp.asarray(x) * root_scale, p))  # noqa: E731
    size = math.comb(dim + p - 1, p)
    S, z, outputs = np.zeros((size, dim)), np.zeros(size), []
    previous_rotation = np.eye(dim)
    for t in range(seq):
        rotation = rotation_matrix(angles[t])
        turn = induced_map(rotation.T @ previous_rotation, p)  # rotation of phi-space by -theta beta_t
        gamma = float(np.exp(log_g[0, t, 0]))
        S = gamma * turn @ S + np.outer(phi(k[0, t, 0]), v[0, t, 0])
        z = gamma * turn @ z + phi(k[0, t, 0])
        outputs.append(phi(q[0, t, 0]) @ S / (phi(q[0, t, 0]) @ z))
        previous_rotation = rotation
    assert relative_error(np.stack(outputs), expected[0, :, 0]) < 1e-9


def test_induced_map_is_orthogonal():
    turn = induced_map(rotation_matrix(np.array([0.3, 1.1])), 2)
    np.testing.assert_allclose(turn.T @ turn, np.eye(turn.shape[0]), atol=1e-10)
