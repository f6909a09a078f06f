"""channel/graph.py: torch-pruning's internals in one place; its index mapping replaced for one
build at a time, and only on the versions that replacement was written against."""
import threading

import pytest
import torch_pruning as tp
from torch_pruning.dependency import index_mapping

from helpers import inputs, seeded, small_cnn
from torch_rlprune.structure.channel import graph


@pytest.fixture
def mapping_seen(monkeypatch):
    """The index-mapping function in place when each build starts and when it ends."""
    seen = []
    build = tp.DependencyGraph.build_dependency

    def spy(self, *args, **kwargs):
        start = index_mapping.update_index_mapping
        try:
            return build(self, *args, **kwargs)
        finally:
            seen.append((start, index_mapping.update_index_mapping))

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", spy)
    return seen


def test_the_tolerant_mapping_lasts_one_build(mapping_seen):
    original = index_mapping.update_index_mapping
    graph.build_graph(seeded(small_cnn, 0).eval(), inputs((2, 1, 16, 16)))
    assert mapping_seen == [(graph.update_index_mapping, graph.update_index_mapping)]
    assert index_mapping.update_index_mapping is original


def test_a_second_build_waits_until_the_first_has_put_the_original_back():
    """Without the wait, the second build would save the replacement as 'the original' and leave
    torch-pruning patched for good, or lose the replacement when the first build restores it."""
    original = index_mapping.update_index_mapping
    saw = []

    def second_build():
        with graph._TolerantIndexMapping(patch=True):
            saw.append(index_mapping.update_index_mapping)

    with graph._TolerantIndexMapping(patch=True):
        thread = threading.Thread(target=second_build)
        thread.start()
        thread.join(timeout=0.3)
        assert thread.is_alive() and not saw, "the second build entered while the first was patching"
    thread.join()
    assert saw == [graph.update_index_mapping]
    assert index_mapping.update_index_mapping is original


def test_another_torch_pruning_version_builds_with_its_own_mapping_and_says_so(mapping_seen, monkeypatch):
    original = index_mapping.update_index_mapping
    monkeypatch.setattr(tp, "__version__", "9.9.0")
    monkeypatch.setattr(graph, "_warned_version", [])
    with pytest.warns(UserWarning, match="torch-pruning 9.9.0"):
        graph.build_graph(seeded(small_cnn, 0).eval(), inputs((2, 1, 16, 16)))
    assert mapping_seen == [(original, original)]


def test_private_types_come_back_as_torch_pruning_builds_them():
    indices = graph.hybrid_indices([3, 1])
    assert [(h.idx, h.root_idx) for h in indices] == [(3, 3), (1, 1)]
    item = graph.group_item("dep", [3, 1], [0, 2])
    assert (item.dep, list(item.idxs), item.root_idxs) == ("dep", [3, 1], [0, 2])
