"""The ground-truth benchmark's world and metrics (bench/ground_truth_world.py): checked on maps built
from the planted masks themselves, where the right answer is known without any model."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from ground_truth_world import (BACKGROUND, World, assign_concepts, concept_part_shares,  # noqa: E402
                                points_at, recovery, tolerance_for)

GRID = 8


def _grid_of(mask: np.ndarray) -> np.ndarray:
    """A mask pooled onto the feature grid: what a perfect concept's heatmap would be."""
    s = mask.shape[0] // GRID
    return mask.reshape(GRID, s, GRID, s).mean(axis=(1, 3))


def test_samples_hold_their_class_parts_and_erasing_a_part_restores_the_background():
    world = World()
    samples = world.samples(3, seed=0)
    for s in samples:
        parts = set(world.class_parts(s.label))
        assert parts <= set(s.part_names)
        name = next(iter(parts))
        erased = s.image(without=(name,))
        mask = s.part(name).mask
        assert np.array_equal(erased[mask], s.background[mask])  # gone where it was
        assert np.array_equal(erased[~mask], s.image()[~mask])  # nothing else changed


def test_perfect_concepts_recover_every_part_and_point_at_it():
    world = World()
    samples = [s for s in world.samples(6, seed=1) if s.label == 0]
    parts = list(world.class_parts(0))
    tol = tolerance_for(GRID, samples[0].background.shape[0])
    heatmaps = [np.stack([_grid_of(s.part(p).mask.astype(float)) for p in parts]) for s in samples]
    assigned = assign_concepts(concept_part_shares(heatmaps, samples, tol))
    assert [r for r, _ in assigned] == parts and all(share > 0.6 for _, share in assigned)  # upsampling blurs
    rate, found = recovery(assigned, parts, min_share=0.4)
    assert rate == 1.0 and found == parts
    for s, hm in zip(samples, heatmaps):
        assert points_at(hm[0], s, parts, tol)


def test_a_background_concept_recovers_nothing_and_points_elsewhere():
    world = World()
    samples = [s for s in world.samples(6, seed=2) if s.label == 1]
    parts = list(world.class_parts(1))
    tol = tolerance_for(GRID, samples[0].background.shape[0])
    heatmaps = []
    for s in samples:  # fires on the cells that hold no part pixel at all
        covered = np.zeros_like(s.background[..., 0], bool)
        for p in s.parts:
            covered |= p.mask
        heatmaps.append((_grid_of(covered.astype(float)) == 0).astype(float)[None])
    assigned = assign_concepts(concept_part_shares(heatmaps, samples, tol))
    assert assigned[0][0] == BACKGROUND
    assert recovery(assigned, parts, min_share=0.4)[0] == 0.0
    assert not any(points_at(hm[0], s, parts, tol) for s, hm in zip(samples, heatmaps) if hm.max() > 0)
