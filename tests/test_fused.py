"""The fused CPU kernels (merge/methods/fused.c) against the eager torch path they replace: the
same bits for every dtype, model count and option, signed zeros, subnormals and ties at the TIES
cut included; split over threads; and the eager path where they cannot be built."""

from __future__ import annotations

import itertools

import pytest
import torch

from evomerge.merge.methods import TensorGroup, fused
from evomerge.merge.methods import linear as linear_method
from evomerge.merge.methods import task_arithmetic as ta

pytestmark = pytest.mark.skipif(fused.library() is None, reason="no C compiler here")
WEIGHTS = (0.6, -0.4, 0.3, 1.1, 0.05)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def awkward(shape, dtype, generator, scale=0.002) -> torch.Tensor:
    """Random values with +0, -0, subnormals and many equal magnitudes."""
    t = torch.randn(shape, generator=generator) * scale
    flat = t.view(-1)
    flat[::13], flat[5::17], flat[7::23] = 0.0, -0.0, flat[7::23] * 1e-36
    flat[::7] = flat[3]
    return t.to(dtype)


@pytest.fixture
def eager(monkeypatch):
    """Runs a callable with the fused kernels switched off."""

    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(fused, "library", lambda: None)
            return fn()

    return run


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("models", [1, 2, 3, 5])
def test_the_combine_is_the_eager_one_bit_for_bit(dtype, models):
    generator = torch.Generator().manual_seed(models)
    base = awkward(100_003, dtype, generator, 0.02)
    deltas = awkward((models, 100_003), dtype, generator)
    weights = torch.tensor(WEIGHTS[:models], dtype=dtype)
    for consensus, normalize, lam in itertools.product([False, True], [False, True], [1.0, 0.7]):
        shared = {"normalize": normalize, "lambda": lam}
        expected = torch.empty_like(base)
        ta._combine(base, deltas, weights, shared, consensus, expected)  # the eager steps
        got = torch.empty_like(base)
        assert fused.combine(base, deltas, weights, shared, consensus, got)
        assert torch.equal(bits(got), bits(expected)), (consensus, normalize, lam)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("models", [1, 2, 4])
def test_linear_is_the_eager_one_bit_for_bit(dtype, models, eager):
    generator = torch.Generator().manual_seed(models)
    tensors = [awkward(200_003, dtype, generator, 0.02) for _ in range(models)]
    group = TensorGroup(tensors, None, "w")
    per_input = [{"weight": w} for w in (0.6, 0.4, -0.3, 1.7)[:models]]
    for normalize in (True, False):
        shared = {"normalize": normalize}
        expected = eager(lambda s=shared: linear_method._linear(group, s, per_input, None))
        got = linear_method._linear(group, shared, per_input, None)
        assert torch.equal(bits(got), bits(expected)), normalize


def ties(base, deltas, densities, normalize=True, lam=1.0):
    params = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, densities, strict=False)]
    shared = {"normalize": normalize, "lambda": lam, "rescale": False, "selection": "fast"}
    return ta.merge_deltas(
        base, deltas, shared, params, None, sparsification="magnitude", consensus=True
    )


@pytest.mark.parametrize("numel", [7, 1000, 300_007])
@pytest.mark.parametrize(
    "densities", [(0.5, 0.3, 0.9), (1.0, 0.2, 0.5), (0.01, 0.99, 0.5), (1e-9, 0.5, 0.0)]
)
def test_ties_fast_selection_inside_the_combine_is_the_eager_one(numel, densities, eager):
    """Every cut: all kept, none but one, ties at the cut split by index; a density of 0 (eager
    zeros) falls back."""
    generator = torch.Generator().manual_seed(numel)
    base = awkward(numel, torch.bfloat16, generator, 0.02)
    for models in (1, 2, 3):
        deltas = awkward((models, numel), torch.bfloat16, generator)
        chosen = densities[:models]
        expected = eager(lambda d=deltas, c=chosen: ties(base, d, c))
        assert (fused.magnitude_cuts(deltas, list(chosen)) is None) == (0.0 in chosen)
        assert torch.equal(bits(ties(base, deltas, chosen)), bits(expected)), (models, chosen)


def test_equal_magnitudes_at_the_cut_are_kept_in_index_order(eager):
    """Every magnitude equal: the cut splits the ties, and the first k entries are kept."""
    generator = torch.Generator().manual_seed(3)
    signs = torch.randint(0, 2, (2, 10_000), generator=generator) * 2 - 1
    deltas = (signs * 0.01).to(torch.bfloat16)
    deltas[1, :5000] = 0.02  # the second model's cut falls on the 0.01s
    base = torch.zeros(10_000, dtype=torch.bfloat16)
    for densities in [(0.3, 0.7), (0.5001, 0.5), (0.9999, 0.6)]:
        expected = eager(lambda d=densities: ties(base, deltas, d))
        assert torch.equal(bits(ties(base, deltas, densities)), bits(expected)), densities


def test_split_over_threads_is_the_same(monkeypatch, eager):
    monkeypatch.setattr(fused, "MIN_SPLIT", 1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        generator = torch.Generator().manual_seed(0)
        base = awkward(10_007, torch.bfloat16, generator, 0.02)
        deltas = awkward((2, 10_007), torch.bfloat16, generator)
        assert fused._parts(10_007) == 3
        expected = eager(lambda: ties(base, deltas, (0.4, 0.6)))
        assert torch.equal(bits(ties(base, deltas, (0.4, 0.6))), bits(expected))
    finally:
        torch.set_num_threads(threads)


def test_the_counts_of_resident_task_vectors_are_kept_until_they_change(eager):
    generator = torch.Generator().manual_seed(1)
    base = awkward(5000, torch.bfloat16, generator, 0.02)
    deltas = awkward((2, 5000), torch.bfloat16, generator)
    ties(base, deltas, (0.4, 0.6))
    assert id(deltas) in fused._RESIDENT
    deltas[0].mul_(3)  # in place: a new version, counted again
    expected = eager(lambda d=deltas: ties(base, d, (0.4, 0.6)))
    assert torch.equal(bits(ties(base, deltas, (0.4, 0.6))), bits(expected))
    key = id(deltas)
    del deltas
    assert key not in fused._RESIDENT


def test_without_a_compiler_the_eager_path_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    fused.library.cache_clear()
    try:
        assert fused.library() is None
        base = torch.zeros(4, dtype=torch.bfloat16)
        deltas = torch.ones((2, 4), dtype=torch.bfloat16)
        weights = torch.tensor([0.5, 0.5], dtype=torch.bfloat16)
        shared = {"normalize": False, "lambda": 1.0}
        assert not fused.combine(base, deltas, weights, shared, False, torch.empty_like(base))
        out = ta.merge_deltas(base, deltas, shared, [{"weight": 0.5}] * 2, None,
                              sparsification=None, consensus=False)  # fmt: skip
        assert out.tolist() == [1.0] * 4
        assert not list(tmp_path.rglob("*.so"))
    finally:
        fused.library.cache_clear()


def test_an_install_without_the_kernel_source_runs_eagerly(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "SOURCE", tmp_path / "fused.c")  # not there
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    fused.library.cache_clear()
    try:
        assert fused.library() is None
    finally:
        fused.library.cache_clear()


class Seeded:
    """Generators as compute.generators_for makes them, telling their seeds (fused.c then needs
    no generator); a plain function (no `seed`) gives fresh generators, whose seeds it reads."""

    def __init__(self, base: int):
        self.base, self.device = base, torch.device("cpu")

    def seed(self, i: int) -> int:
        return self.base + 7919 * i

    def __call__(self, i: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed(i))


RANDOM_CASES = [  # shape, per-model (density, epsilon), sign election, rescale
    ((623,), [(0.3, 0.1), (0.5, 0.2)], True, True),
    ((1249,), [(0.9, 0.05), (1.0, 0.0), (0.2, 0.1)], False, True),
    ((70_001,), [(0.5, 0.1), (0.7, 0.25)], True, True),  # two of torch's sum chunks at 2 threads
    ((37, 911), [(0.6, 0.3), (0.4, 0.1)], True, False),
    ((64, 600), [(0.5, 0.1), (0.0, 0.0), (0.45, 0.4)], True, True),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["random", "della_magprune"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dare_and_della_are_the_eager_ones_bit_for_bit(dtype, kind, threads, eager):
    """fused.c's masks are torch.bernoulli's draws from the same seeds (across the generator's
    624-draw refills, seeds past 32 bits), DELLA's keep probabilities the eager ones, and the
    rescale factors come from the L1 norms torch's sum gives (split in chunks at 2 threads)."""
    generator = torch.Generator().manual_seed(11)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, (shape, models, consensus, rescale) in enumerate(RANDOM_CASES):
            base = awkward(shape, dtype, generator, 0.02)
            deltas = awkward((len(models), *shape), dtype, generator)
            params = [{"weight": WEIGHTS[i], "density": d, "epsilon": e}
                      for i, (d, e) in enumerate(models)]  # fmt: skip
            if kind == "random" and n == 4:
                params[1]["density"] = 0.0  # every entry dropped: no rescale
            shared = {"normalize": consensus, "lambda": 1.0, "rescale": rescale}
            fresh = lambda i, n=n: torch.Generator().manual_seed(n + i)  # noqa: E731
            for generators in (Seeded(2**40 + n), fresh):

                def merge(g=generators, b=base, d=deltas, p=params, s=shared, c=consensus):
                    return ta.merge_deltas(b, d, s, p, g, sparsification=kind, consensus=c)

                assert fused.random_sparsified(deltas, kind, params, generators, rescale)
                expected = eager(merge)
                assert torch.equal(bits(merge()), bits(expected)), (shape, models)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("kind", ["random", "della_magprune"])
def test_infinite_and_nan_entries_are_masked_as_torch_masks_them(kind, eager):
    """x * 0 is NaN for an infinite or NaN x: dropped, they stay NaN, and the norms they make
    infinite or NaN are torch's. (NaN payloads may differ: a merge with a NaN is refused.)"""
    generator = torch.Generator().manual_seed(8)
    base = awkward((20, 500), torch.bfloat16, generator, 0.02)
    deltas = awkward((2, 20, 500), torch.bfloat16, generator)
    deltas[0, 3, 7], deltas[0, 5, 9], deltas[1, 2, 2] = float("inf"), float("-inf"), float("nan")
    params = [{"weight": 0.5, "density": 0.5, "epsilon": 0.2}] * 2
    for consensus, rescale in [(True, True), (False, False)]:
        shared = {"normalize": consensus, "lambda": 1.0, "rescale": rescale}

        def merge(c=consensus, s=shared):
            return ta.merge_deltas(base, deltas, s, params, Seeded(1), sparsification=kind,
                                   consensus=c)  # fmt: skip

        got, expected = merge(), eager(merge)
        assert torch.equal(got.isnan(), expected.isnan()), (consensus, rescale)
        finite = ~expected.isnan()
        assert torch.equal(bits(got)[finite], bits(expected)[finite]), (consensus, rescale)


def test_l1_norms_are_torchs_or_left_to_torch():
    """`_l1_after` from exact per-chunk sums: torch's bfloat16 sum whenever it answers, and no
    answer where the exact sum sits so close to a rounding boundary that torch's float32 order
    decides (1 + 2^-8 + 2^-30: torch's float32 sum drops 2^-30 and rounds the tie to 1)."""
    generator = torch.Generator().manual_seed(3)
    saved = torch.get_num_threads()
    unanswered = 0
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for _ in range(300):
                n = int(torch.randint(100, 120_000, (1,), generator=generator))
                scale = float(torch.rand(1, generator=generator)) * 10
                magnitudes = (torch.randn(n, generator=generator) * scale).bfloat16().abs()
                chunk, parts = fused._sum_chunks(n)
                exact = magnitudes.double()
                sums = [float(exact[p * chunk : (p + 1) * chunk].sum()) for p in range(parts)]
                got = fused._l1_after(sums, n, chunk)
                unanswered += got is None
                assert got is None or got == float(magnitudes.sum()), (threads, n)
            tie = torch.zeros(5000, dtype=torch.bfloat16)
            tie[:3] = torch.tensor([1.0, 2**-8, 2**-30])
            assert float(tie.sum()) == 1.0  # torch's; the exact sum rounds to 1 + 2^-7
            chunk, parts = fused._sum_chunks(5000)
            assert fused._l1_after([1 + 2**-8 + 2**-30], 5000, chunk) is None
    finally:
        torch.set_num_threads(saved)
    assert unanswered < 30  # about 1 in 200 here; each costs one torch sum


def test_without_a_vouched_norm_torch_sums_it(monkeypatch, eager):
    monkeypatch.setattr(fused, "_l1_after", lambda *args: None)
    generator = torch.Generator().manual_seed(2)
    base = awkward(5000, torch.bfloat16, generator, 0.02)
    deltas = awkward((2, 5000), torch.bfloat16, generator)
    params = [{"weight": 0.5, "density": 0.4}, {"weight": 0.7, "density": 0.6}]
    shared = {"normalize": False, "lambda": 1.0, "rescale": True}

    def merge():
        return ta.merge_deltas(base, deltas, shared, params, Seeded(5), sparsification="random",
                               consensus=True)  # fmt: skip

    assert torch.equal(bits(merge()), bits(eager(merge)))


def test_ties_magnitude_counts_are_kept_and_counted():
    """The counts TIES' fast selection keeps per task vector are in derived_bytes (so in
    ResidentMerger.resident_bytes), and go when the task vectors change."""
    generator = torch.Generator().manual_seed(6)
    base = awkward(50_000, torch.bfloat16, generator, 0.02)
    deltas = awkward((2, 50_000), torch.bfloat16, generator)
    assert fused.derived_bytes(deltas) == 0
    ties(base, deltas, (0.3, 0.6))
    kept = fused._RESIDENT[id(deltas)][1]
    counts = [t for (what, _), v in kept.items() if what == "counts" for t in v]
    assert len(counts) == 4
    assert fused.derived_bytes(deltas) == sum(t.numel() * t.element_size() for t in counts) > 0
    deltas[0].neg_()
    assert fused.derived_bytes(deltas) == 0


def test_della_rank_norms_are_kept_until_the_task_vectors_change(eager):
    generator = torch.Generator().manual_seed(4)
    base = awkward((40, 300), torch.bfloat16, generator, 0.02)
    deltas = awkward((2, 40, 300), torch.bfloat16, generator)
    params = [{"weight": 0.5, "density": 0.4, "epsilon": 0.2}] * 2
    shared = {"normalize": True, "lambda": 1.0, "rescale": True}

    def merge(d):
        return ta.merge_deltas(base, d, shared, params, Seeded(9),
                               sparsification="della_magprune", consensus=True)  # fmt: skip

    fused.prepare(deltas, "della_magprune")
    assert fused.derived_bytes(deltas) == deltas.numel() * deltas.element_size()
    deltas[1].mul_(-2)  # in place: a new version, ranked again
    assert fused.derived_bytes(deltas) == 0
    assert torch.equal(bits(merge(deltas)), bits(eager(lambda d=deltas: merge(d))))
    key = id(deltas)
    del deltas
    assert key not in fused._RESIDENT


def test_a_generator_already_drawn_from_is_left_to_torch():
    generator = torch.Generator().manual_seed(9)
    torch.rand(3, generator=generator)
    deltas = torch.ones((1, 10), dtype=torch.bfloat16)
    params = [{"weight": 1.0, "density": 0.5}]
    assert fused.random_sparsified(deltas, "random", params, lambda i: generator, True) is None


def test_scalars_round_into_the_dtype_as_torch_rounds_them():
    values = [0.1, 1 / 3, 0.7 + 1e-9, 1e-40, 3e-39, 3.3e38, 3.5e38, 1e39, -0.3, 2**-130, 0.0]
    for dtype in (torch.bfloat16, torch.float32):
        for value in values:
            expected = float(torch.tensor(value, dtype=torch.float32).to(dtype))
            assert fused._in_dtype(value, dtype) == expected, (dtype, value)
