"""bench.py: an end-to-end smoke run on `tiny`, and checks that its references compare like with like.

Benchmarks are not timed tests: nothing here asserts a speed, only that the table is complete and sane and that
the bare references compute the same thing as the code they are compared with.
"""

import json
import math

import pytest
import torch

import bench
from student import load_backbone
from teacher import Teacher


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny", None, "cpu")


def test_smoke_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    res = bench.main(
        [
            "--device",
            "cpu",
            "--backbone",
            "tiny",
            "--sizes",
            "128x256",
            "--strides",
            "64,24",
            "--train-size",
            "128x128",
            "--warmup",
            "1",
            "--reps",
            "1",
            "--json",
            str(out),
            "--markdown",
            str(md),
        ]
    )
    whats = [r["what"] for r in res["rows"]]
    expected = [
        "single pass: dense vs bare timm",
        "single pass: trunk vs bare timm",
        "teacher s=64 vs model-only",
        "teacher s=24 vs model-only",
        "speed-up: teacher s=24 / single pass",
        "train step (last 2 blocks) vs bare fwd+bwd",
        "train step (all blocks) vs bare fwd+bwd",
    ]
    assert whats == expected
    for r in res["rows"]:
        assert r["size"] in ("128x256", "128x128")
        for key in ("ours_s", "ref_s", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["what"], key, r[key])
        assert r["extrapolated"] is False and r["ours_peak_bytes"] is None  # CPU: memory is n/a
    teacher_rows = [r for r in res["rows"] if r["what"].startswith("teacher")]
    backbone = load_backbone("tiny", None)
    for r, s in zip(teacher_rows, (64, 24)):
        assert r["windows"] == Teacher(backbone, stride=s).num_windows(128, 256)
    # the machine-readable copies
    data = json.loads(out.read_text())
    assert set(data) == {"meta", "rows", "targets"} and len(data["rows"]) == len(expected)
    assert data["meta"]["dtype"] == "fp32" and data["meta"]["agreement_native"] < 1e-6
    table = md.read_text()
    assert "| measurement | size | windows | ours | reference | ratio | target | ours FLOP/s |" in table
    assert table.count("\n| ") == 1 + len(expected)  # header + one line per row
    assert "targets" in capsys.readouterr().out


def test_an_extrapolated_teacher_costs_its_windows_times_the_model_time_per_window(capsys):
    """Above --max-call a row is estimated: model-only = n windows x the per-window time (3 and 9 windows here, not
    rounded up to full batches of 16)."""
    argv = ["--device", "cpu", "--backbone", "tiny", "--sizes", "128x256,256x256", "--strides", "64", "--no-train"]
    res = bench.main([*argv, "--warmup", "0", "--reps", "1", "--max-call", "1e-9"])
    rows = [r for r in res["rows"] if r["what"].startswith("teacher")]
    assert [r["windows"] for r in rows] == [3, 9] and all(r["extrapolated"] for r in rows)
    assert rows[1]["ref_s"] == pytest.approx(3 * rows[0]["ref_s"])
    assert all(r["note"].startswith(f"model-only = {r['windows']} windows x") for r in rows)


def test_naflex_is_benchmarked_single_pass_only_at_its_budget(tmp_path, capsys):
    """The single-pass baseline has no window: the teacher rows are a logged skip, not an error; its budget is in
    the header."""
    argv = ["--device", "cpu", "--backbone", "siglip2-naflex-b16", "--sizes", "64x128", "--strides", "24"]
    res = bench.main([*argv, "--no-train", "--reps", "1", "--naflex-patches", "8", "--json", str(tmp_path / "b.json")])
    assert "skip: teacher rows: siglip2-naflex-b16 is a single-pass baseline" in capsys.readouterr().out
    assert [r["what"] for r in res["rows"]] == ["single pass: dense (no bare ref.)"]
    assert res["rows"][0]["ours_s"] > 0 and res["meta"]["naflex_patches"] == 8


def test_bare_reference_matches_our_trunk_at_native_resolution(tiny):
    """Apples to apples: timm's forward_features and our `tokens` are the same function at K x K."""
    ref = bench.bare_trunk(tiny)
    x = torch.randn(2, 3, tiny.window, tiny.window, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, grid = tiny.tokens(x)
        theirs = ref.forward_features(x)
    assert grid == tiny.native_grid
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert bench.agreement(tiny, ref, tiny.window, tiny.window) < 1e-6


def test_model_only_runs_exactly_the_teachers_windows(tiny, monkeypatch):
    """The teacher's reference does the same number of windows, in batches of the same size, as the teacher."""
    seen = []
    monkeypatch.setattr(tiny, "dense", lambda x: seen.append(x.shape[0]) or torch.zeros(x.shape[0], 1, 1, 1))
    for n, batch in ((37, 16), (16, 16), (5, 16), (1, 4)):
        seen.clear()
        bench.model_only(tiny, n, batch)()
        assert sum(seen) == n and max(seen) <= batch and len(seen) == math.ceil(n / batch)


def test_head_flop_share_is_small_at_paper_scale(tiny):
    """The dense head is an extra ~10 C^2 per token: a visible share for `tiny`, less as the image grows."""
    small, large = bench.head_flop_share(tiny, 128, 128), bench.head_flop_share(tiny, 1024, 2048)
    assert 1.0 < large < small < 1.5


def test_cpu_and_gpu_window_crops_are_identical():
    """teacher.crop_windows slices on CPU and gathers on GPU (a speed choice): both give the same windows."""
    from teacher import crop_windows, gather_windows

    x = torch.randn(2, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    b, y0, x0 = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 6, 38, 20]), torch.tensor([0, 58, 10, 33])
    sliced, gathered = crop_windows(x, b, y0, x0, 32), gather_windows(x, b, y0, x0, 32)
    assert torch.equal(sliced, gathered) and sliced.shape == (4, 3, 32, 32)
    assert torch.equal(sliced[2], x[1, :, 38:70, 10:42])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sizes", "0x0"], "at least 1x1"),
        (["--sizes", "abc"], "HxW"),
        (["--train-size", "12"], "--train-size"),
        (["--strides", "0"], "--strides"),
        (["--strides", "24,x"], "--strides"),
        (["--strides", "999"], "at most the 128 px window"),
        (["--json", "/proc/spar-bench/x.json"], "cannot write"),
        (["--markdown", "{tmp}"], "is a folder"),
        (["--device", "bogus"], "unknown device"),
        (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "GPU"),
    ],
)
def test_cli_bad_arguments_one_line_exit_2(tmp_path, capsys, extra, message):
    """Each bad argument: ONE `error:` line and exit 2 before any measuring (not exit 1, not a traceback)."""
    with pytest.raises(SystemExit) as exc:
        bench.main(
            ["--device", "cpu", "--backbone", "tiny", "--sizes", "128x128", "--no-train"]
            + [e.format(tmp=tmp_path) for e in extra]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("error:") == 1 and "Traceback" not in err
