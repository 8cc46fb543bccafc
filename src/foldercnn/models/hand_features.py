"""Hand features: 21 keypoints -> numbers that do not change with the hand's place, size, in-plane rotation or
side (left/right, palm/back). numpy only (no PyTorch), so an exported hands model runs on onnxruntime alone."""

import numpy as np

WRIST, THUMB_TIP, INDEX_MCP, MIDDLE_MCP, PINKY_MCP = 0, 4, 5, 9, 17
TIPS = (4, 8, 12, 16, 20)
# bones of each finger, base to tip: the angle between consecutive bones is how bent a joint is
FINGERS = ((1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16), (17, 18, 19, 20))
_PAIRS = np.triu_indices(21, k=1)


def _unit(v, eps=1e-9):
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + eps)


def canonical_2d(points):
    """(N, 21, 2) image points -> wrist at the origin, wrist->middle knuckle along +y with length 1, and the
    index knuckle on the +x side (so left and right hands, palm or back, line up)."""
    p = points - points[:, WRIST : WRIST + 1]
    up = p[:, MIDDLE_MCP]
    scale = np.linalg.norm(up, axis=-1) + 1e-9
    c, s = up[:, 1] / scale, up[:, 0] / scale  # rotate `up` onto +y
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (N, 2, 2)
    q = np.einsum("nij,nkj->nki", rot, p) / scale[:, None, None]
    flip = np.where(q[:, INDEX_MCP, 0] < q[:, PINKY_MCP, 0], -1.0, 1.0)
    q[..., 0] *= flip[:, None]
    return q


def canonical_3d(world):
    """(N, 21, 3) world points -> the hand's own frame: y from wrist to middle knuckle (length 1), z the palm's
    normal turned towards the side the fingertips bend to, x completing it. Any 3-D rotation, size or mirror
    image of the hand gives the same coordinates."""
    p = world - world[:, WRIST : WRIST + 1]
    scale = np.linalg.norm(p[:, MIDDLE_MCP], axis=-1, keepdims=True) + 1e-9
    y = _unit(p[:, MIDDLE_MCP])
    n = _unit(np.cross(p[:, INDEX_MCP], p[:, PINKY_MCP]))
    x = _unit(np.cross(y, n))
    z = np.cross(x, y)
    q = np.stack([np.einsum("nkd,nd->nk", p, a) for a in (x, y, z)], -1) / scale[:, None]
    bend = np.where(q[:, list(TIPS[1:]), 2].sum(1) < 0, -1.0, 1.0)  # in this frame a mirror image flips z only
    q[..., 2] *= bend[:, None]
    return q


def joint_angles(world):
    """(N, 15): the cosine of the angle at each finger joint (1: straight)."""
    out = []
    for base, a, b, tip in FINGERS:
        chain = (WRIST, base, a, b, tip)
        for i in range(1, 4):
            u = _unit(world[:, chain[i]] - world[:, chain[i - 1]])
            v = _unit(world[:, chain[i + 1]] - world[:, chain[i]])
            out.append((u * v).sum(-1))
    return np.stack(out, -1)


def hand_features(points, world):
    """(N, 21, 3) image points and (N, 21, 3) world points -> (N, FEATURES) float32: the canonical 2-D
    coordinates, every pairwise 2-D distance (relative to the palm's length) and the joint angles in 3-D.
    (The 3-D canonical coordinates and distances were measured too and cost accuracy: benchmarks/README.md.)"""
    points, world = np.asarray(points, np.float64), np.asarray(world, np.float64)
    q2 = canonical_2d(points[..., :2])
    d2 = np.linalg.norm(q2[:, _PAIRS[0]] - q2[:, _PAIRS[1]], axis=-1)
    parts = [q2[:, 1:].reshape(len(q2), -1), d2, joint_angles(world)]
    return np.concatenate(parts, axis=1).astype(np.float32)


FEATURES = 20 * 2 + len(_PAIRS[0]) + 15
