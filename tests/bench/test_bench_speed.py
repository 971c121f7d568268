"""issue 11/10 bench pieces on CPU: random-data cells (ours and the HF reference on the same rows),
warm-up vs steady-state timing, the loop options as axes, reference cells shared and skipped,
the HF + bitsandbytes layer swap, and the longest-sequence searches (planner and probes)."""

from __future__ import annotations

import json

import pytest
import torch

from solotune.bench import cell as cellmod
from solotune.bench import runner
from solotune.bench.cell import CellSpec, run_cell
from solotune.bench.plan import GiB, LoRASpec, Setup, longest_seq_len, predict
from solotune.bench.report import reference_differs
from solotune.config import PRESETS
from solotune.errors import ConfigError

HF = pytest.mark.skipif(not __import__("solotune.bench.hf_cell", fromlist=["available"]).available(),
                        reason="transformers/peft not installed")
KW = dict(model="tiny", samples=3, seq_len=16, data="random", precision="bf16", device="cpu")


@HF
def test_random_rows_are_the_same_for_our_cell_and_the_hf_cell():
    ours = run_cell(CellSpec(**KW))
    hf = run_cell(CellSpec(**KW, impl="hf"))
    for r in (ours, hf):
        assert r["status"] == "ok", r["error"]
        assert r["data"] == "random" and r["max_seq_len_data"] == 16
        assert r["tokens"] == 3 * 16  # every row exactly seq_len tokens
        assert r["warmup_steps"] == 2 and r["steady_steps"] == 1 and r["steady_tokens_per_s"] > 0
        assert r["compile_s"] is None  # not a compiled cell
    assert hf["trainable_params"] == ours["trainable_params"]
    # the rows the HF cell reads are the loop's: same ids for the same (seed, index)
    from solotune.bench.tokens import preset_cell_tokenizer

    tok = preset_cell_tokenizer(PRESETS["tiny"].vocab_size)
    rows = cellmod.cell_examples(CellSpec(**KW), tok, None)
    from solotune.data.synthetic import random_row

    assert [e.input_ids for e in rows] == [random_row(i, 16, tok.vocab_size, 0).input_ids for i in range(3)]


def test_warmup_and_steady_state_are_timed_apart():
    log = [{"time_s": 5.0, "tokens": 100}, {"time_s": 6.0, "tokens": 200}, {"time_s": 6.5, "tokens": 300},
           {"time_s": 7.0, "tokens": 400}]
    res: dict = {}
    cellmod._warmup_and_steady(res, CellSpec(compile="blocks", warmup_steps=2), log)
    assert res["warmup_steps"] == 2 and res["warmup_s"] == 6.0 and res["steady_steps"] == 2
    assert res["steady_tokens_per_s"] == pytest.approx(200 / 1.0)
    assert res["compile_s"] == pytest.approx(6.0 - 2 * 0.5)  # the warm-up beyond two steady steps
    short: dict = {}
    cellmod._warmup_and_steady(short, CellSpec(warmup_steps=2), log[:1])
    assert short["warmup_steps"] == 0 and short["steady_steps"] == 1 and short.get("compile_s") is None


def test_a_step_that_compiled_after_the_warmup_is_not_steady():
    """A graph compiled after the warm-up (e.g. the first packed row holding a single document) is
    kept out of the steady rate and counted with the compile time."""
    log = [{"time_s": 5.0, "tokens": 100}, {"time_s": 6.0, "tokens": 200}, {"time_s": 6.5, "tokens": 300},
           {"time_s": 16.5, "tokens": 400}, {"time_s": 17.0, "tokens": 500}]
    res: dict = {}
    cellmod._warmup_and_steady(res, CellSpec(compile="blocks", warmup_steps=2), log, graphs=[2, 3, 3, 4, 4])
    assert res["steady_steps"] == 2 and res["compile_steps_after_warmup"] == 1
    assert res["steady_tokens_per_s"] == pytest.approx(200 / 1.0)  # steps 3 and 5, not the 10 s step 4
    assert res["compile_s"] == pytest.approx(17.0 - 500 * 0.005)
    same: dict = {}  # without the counts (or none compiled): every later step is steady, as before
    cellmod._warmup_and_steady(same, CellSpec(compile="blocks", warmup_steps=2), log, graphs=[2, 3, 3, 3, 3])
    assert same["steady_steps"] == 3 and same["steady_tokens_per_s"] == pytest.approx(300 / 11.0)


def test_loop_options_are_axes_flags_and_part_of_the_cell():
    cells = runner.matrix(runner.BenchConfig(model="tiny", axes=("compile",), fixed={"precision": True},
                                             precision_on="bf16", data="random", kernels="triton"))
    assert [c.compile for c in cells] == ["off", "blocks"] and {c.kernels for c in cells} == {"triton"}
    assert {c.data for c in cells} == {"random"} and len({c.cell_id for c in cells}) == 2
    assert cells[1].cell_id.endswith("-compileblocks-kernelstriton-solotune")
    ref = cells[1].as_reference("hf")
    assert (ref.impl, ref.compile, ref.kernels) == ("hf", "off", "off")
    with pytest.raises(ConfigError, match="compile"):
        CellSpec(compile="everything")
    with pytest.raises(ConfigError, match="loop options"):
        CellSpec(impl="hf", packing="on")
    with pytest.raises(ConfigError, match="--fix"):
        runner.BenchConfig(axes=("compile",), fixed={"compile": True})


def test_reference_cells_are_shared_across_loop_options_and_skipped_with_a_reason(tmp_path, monkeypatch):
    ran: list[CellSpec] = []

    def fake(spec, timeout_s, log):
        ran.append(spec)
        return {**runner._failed(spec, "", 0.0, status="ok"), "error": None, "wall_s": 0.0, "runtime_s": 1.0,
                "mean_loss": 1.0, "peak_alloc_bytes": 1}

    monkeypatch.setattr(runner, "run_cell_subprocess", fake)
    monkeypatch.setattr(runner, "measure_matmul", lambda *a: {"device": None, "matmul_tflops": None})
    monkeypatch.setattr("solotune.bench.hf_cell.missing_package",
                        lambda impl, q: "liger-kernel is not installed" if impl == "hf-liger" else None)
    bc = runner.BenchConfig(model="tiny", axes=("compile",), reference="hf,hf-liger", out=str(tmp_path), data="random")
    results = runner.run_bench(bc, say=lambda *_: None)
    assert [s.impl for s in ran] == ["solotune", "hf", "solotune"]  # one HF cell for both compile settings
    liger = [r for r in results if r["impl"] == "hf-liger"]
    assert len(liger) == 2 and all(r["status"] == "skipped" and "liger-kernel" in r["error"] for r in liger)
    assert json.loads((tmp_path / "cells.json").read_text())[0]["data"] == "random"
    md = (tmp_path / "report.md").read_text()
    assert "## Speed: steady state" in md and "HF+Liger peak" in md and "random tokens" in md
    assert "compile=blocks" in md  # the loop option is shown on its row
    gap = CellSpec(model="tiny", grad_checkpoint="every:2")
    assert "every:2" in cellmod.reference_gap(gap)
    assert runner.reference_cell(gap, "hf", {"status": "ok"}, {}, 1.0, None)["status"] == "skipped"


def test_a_technique_hf_lacks_is_compared_with_its_nearest_reference(tmp_path, monkeypatch):
    """Offload and another optimizer: the HF cell runs without them (not skipped), once for both
    solotune cells, and the report says what it ran without."""
    ran: list[CellSpec] = []

    def fake(spec, timeout_s, log):
        ran.append(spec)
        return {**runner._failed(spec, "", 0.0, status="ok"), "error": None, "wall_s": 0.0, "runtime_s": 1.0,
                "mean_loss": 1.0, "peak_alloc_bytes": 2 if spec.impl == "hf" else 1}

    monkeypatch.setattr(runner, "run_cell_subprocess", fake)
    monkeypatch.setattr(runner, "measure_matmul", lambda *a: {"device": None, "matmul_tflops": None})
    monkeypatch.setattr("solotune.bench.hf_cell.missing_package", lambda impl, q: None)
    for i, extra in enumerate(({"offload": "activations"}, {"optimizer": "adamw-8bit", "offload": "activations"},
                               {"quantize": "fp8", "offload": "activations"})):
        bc = runner.BenchConfig(model="tiny", axes=(), reference="hf", out=str(tmp_path / str(i)), data="random",
                                fixed={"gc": True}, **extra)
        results = runner.run_bench(bc, say=lambda *_: None)
        hf = [r for r in results if r["impl"] == "hf"]
        assert len(hf) == 1 and hf[0]["status"] == "ok"
        assert (ran[-1].impl, ran[-1].offload, ran[-1].optimizer, ran[-1].quantize) == ("hf", "none", "adamw", "none")
        md = (tmp_path / str(i) / "report.md").read_text()
        assert "ran without offload activations" in md and "0.50" in md  # the memory ratio is shown
        assert ("optimizer adamw-8bit" in md) == ("optimizer" in extra)
        assert ("quantize fp8 (its reference: the 16-bit base)" in md) == ("quantize" in extra)
    assert [s.impl for s in ran] == ["solotune", "hf"] * 3
    assert reference_differs(CellSpec(model="tiny", offload="activations").to_dict()) == ["offload activations"]
    assert reference_differs(CellSpec(model="tiny").to_dict()) == []


def test_reference_cells_without_their_device_are_skipped_not_failed():
    for spec in (CellSpec(model="tiny", impl="hf-liger", device="cpu"),
                 CellSpec(model="tiny", impl="hf", quantize="nf4", device="cpu")):
        r = run_cell(spec)
        assert r["status"] == "skipped" and ("CUDA" in r["error"] or "not installed" in r["error"]), r["error"]
    with pytest.raises(ConfigError, match="int8"):
        CellSpec(impl="hf", quantize="int8")


@HF
def test_the_bnb_swap_replaces_every_decoder_linear_and_nothing_else():
    from transformers import LlamaConfig, LlamaForCausalLM

    from solotune.bench.hf_cell import swap_linears

    cfg = PRESETS["tiny"]
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items()
                                         if k not in ("architectures", "model_type", "torch_dtype")}))
    seen = []

    class Marker(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            seen.append(tuple(lin.weight.shape))

    n = swap_linears(hf.model.layers, Marker)
    assert n == 7 * cfg.n_layers == len(seen)
    assert not any(type(m) is torch.nn.Linear for m in hf.model.layers.modules())
    assert type(hf.lm_head) is torch.nn.Linear


# ------------------------------------------------------------------------ longest sequence
def _setup(**kw):
    return Setup(PRESETS["tiny"], batch=1, grad_checkpoint="all", precision="bf16", lora=LoRASpec(), device="cpu", **kw)


def test_longest_seq_len_is_the_last_length_that_fits():
    s = _setup()  # each dry run takes a second or two on a busy CPU: few probes
    mem = predict(s.replace(seq_len=1000)).peak
    r = longest_seq_len(s, mem, step=256, cap=2048)
    assert r.seq_len == 768 and r.prediction.peak <= mem and r.first_over == 1024
    assert r.probes <= 4  # bisection: 256, 512, 1024, 768
    assert longest_seq_len(s, 1, step=256).seq_len is None
    assert longest_seq_len(s, 100 * GiB, step=256, cap=512).seq_len == 512  # the cap fits


PEAKS = {  # monotone peaks (bytes) of seq_len T: the search must find the boundary bisection finds
    "linear": lambda T: 3e9 + 2.5e5 * T,
    "convex": lambda T: 3e9 + 1e5 * T + 0.4 * T * T,
    "concave": lambda T: 3e9 + 4e7 * T ** 0.5,
    "kinked": lambda T: 3e9 + (6e5 * T if T < 4096 else 6e5 * 4096 + 1e5 * (T - 4096)),
    "flat-then-steep": lambda T: 3e9 + (0 if T < 20_000 else 1e6 * (T - 20_000)),
}


@pytest.mark.parametrize("name", list(PEAKS))
@pytest.mark.parametrize("limit_gib", [4, 24, 80])
@pytest.mark.parametrize("cap", [1 << 20, 100_000])
def test_longest_seq_len_equals_the_brute_force_answer(monkeypatch, name, limit_gib, cap):
    from types import SimpleNamespace

    from solotune.bench import plan

    peak = PEAKS[name]
    monkeypatch.setattr(plan, "predict", lambda s: SimpleNamespace(peak=peak(s.seq_len), host_bytes=0))
    step, mem = 128, limit_gib * GiB
    grid = [*range(step, cap + 1, step)] + ([cap] if cap % step else [])
    want = max((T for T in grid if peak(T) <= mem), default=None)
    r = longest_seq_len(_setup(), mem, step=step, cap=cap)
    assert r.seq_len == want, (r.seq_len, want)
    if want is not None:
        assert r.first_over == (None if want == cap else next(T for T in grid if T > want))
    assert r.probes <= 2 * (cap // step).bit_length() + 2  # never much worse than bisection
    if name == "linear":
        assert r.probes <= 6, r.probes  # the line meets the limit where the peak does


def test_longest_seq_len_binds_on_host_memory_too(monkeypatch):
    from types import SimpleNamespace

    from solotune.bench import plan

    monkeypatch.setattr(plan, "predict", lambda s: SimpleNamespace(peak=1e9 + 1e4 * s.seq_len,
                                                                   host_bytes=2.6e5 * s.seq_len))
    r = longest_seq_len(_setup(), 80 * GiB, step=128, cap=1 << 20, host_mem=64 * GiB)
    assert r.seq_len == int(64 * GiB / 2.6e5) // 128 * 128 and r.probes <= 8


def test_plan_max_seq_len_cli(capsys):
    from solotune.cli import main

    code = main(["plan", "--max-seq-len", "--model", "tiny", "--gpu-mem", "6MiB", "--quantize", "nf4",
                 "--seq-len-step", "256", "--seq-len-cap", "1024", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and len(rows) == 1 and rows[0]["seq_len"] and rows[0]["peak"] <= 6 * 2**20
    assert rows[0]["label"] == "lora nf4" and rows[0]["prediction"]["precision"] == "bf16"  # the mode's defaults


def test_plan_max_seq_len_shows_pinned_host_memory_of_offloaded_rows(capsys):
    from solotune.cli import main

    args = ["plan", "--max-seq-len", "--model", "tiny", "--gpu-mem", "6MiB", "--seq-len-step", "256",
            "--seq-len-cap", "512"]
    assert main(args + ["--offload", "none"]) == 0
    assert "host (pinned)" not in capsys.readouterr().out
    assert main(args + ["--offload", "activations"]) == 0
    out = capsys.readouterr().out
    head, sep, row = out.splitlines()[2:5]
    assert "host (pinned)" in head and head.count("|") == sep.count("|") == row.count("|")
    assert main(args + ["--offload", "activations", "--host-mem", "1KiB"]) == 1  # no row's copies fit 1 KiB
    out = capsys.readouterr().out
    assert "pinned host memory 0.00 GiB" in out and "does not fit" in out


def test_host_memory_limits_the_longest_offloaded_row():
    """--host-mem: the pinned copies of an offloaded row must fit too (page-locked RAM is not swappable)."""
    s = _setup(offload="activations")
    free = longest_seq_len(s, 100 * GiB, step=256, cap=1024)
    assert free.seq_len == 1024 and free.prediction.host_bytes > 0
    capped = longest_seq_len(s, 100 * GiB, step=256, cap=1024, host_mem=free.prediction.host_bytes - 1)
    assert 256 <= capped.seq_len < 1024 and capped.prediction.host_bytes < free.prediction.host_bytes
    assert capped.first_over == capped.seq_len + 256


def test_probe_lengths_bracket_the_prediction():
    assert runner.probe_lengths(1000, {}, 0.04, 128) == 1000
    assert runner.probe_lengths(1024, {1024: "ok"}, 0.04, 128) == 1152  # 4% up, rounded up to a step
    assert runner.probe_lengths(1024, {1024: "oom"}, 0.04, 128) == 896
    assert runner.probe_lengths(1024, {1024: "ok", 1152: "ok"}, 0.04, 128) >= 1152 * 1.08
    assert runner.probe_lengths(1024, {1024: "ok", 2048: "oom"}, 0.04, 128) == 1536
    assert runner.probe_lengths(1024, {1024: "ok", 1152: "oom"}, 0.04, 128) is None


def test_find_max_seq_len_measures_around_the_planner(tmp_path, monkeypatch):
    true_max = 300

    def fake(spec, timeout_s, log):
        assert (spec.data, spec.micro_batch, spec.samples, spec.memory_limit_bytes) == ("random", 1, 2, 2 * 2**20)
        st = "ok" if spec.seq_len <= true_max else "oom"
        return {**runner._failed(spec, "", 0.0, status=st), "error": None, "peak_alloc_bytes": spec.seq_len}

    monkeypatch.setattr(runner, "run_cell_subprocess", fake)
    bc = runner.BenchConfig(model="tiny", axes=(), fixed={"gc": True, "precision": True}, precision_on="bf16",
                            memory_limit_bytes=2 * 2**20, out=str(tmp_path), device="cpu")
    found = runner.find_max_seq_len(bc, max_probes=8, rel_step=0.5, step=64, say=lambda *_: None)
    assert found["predicted_longest"] and found["longest_fit"] <= true_max < found["shortest_oom"]
    assert found["shortest_oom"] - found["longest_fit"] <= 64 and len(found["probes"]) <= 8
    saved = json.loads((tmp_path / "max_seq_len.json").read_text())[0]
    assert saved["longest_fit"] == found["longest_fit"] and len(saved["probes"]) == len(found["probes"])
    assert f"longest that trained **{found['longest_fit']}**" in (tmp_path / "max_seq_len.md").read_text()
    margin = runner.find_max_seq_len(bc, max_probes=1, step=64, probe_start=0.5, say=lambda *_: None)
    assert [p["seq_len"] for p in margin["probes"]] == [int(found["predicted_longest"] * 0.5) // 64 * 64]
    with pytest.raises(ConfigError, match="probe-start"):
        runner.find_max_seq_len(bc, probe_start=1.5)
    with pytest.raises(ConfigError, match="memory-limit"):
        runner.find_max_seq_len(runner.BenchConfig(model="tiny"))


def test_progress_line_shows_the_steady_rate_and_the_compile_time_apart():
    """A compiled cell's whole-run rate carries its compilation: the line shows the steady state."""
    from solotune.bench.runner import progress_line

    r = dict(grad_accum=1, grad_checkpoint="off", precision="bf16", method="lora", impl="solotune", status="ok",
             predicted_peak_bytes=None, peak_alloc_bytes=2**30, runtime_s=17.6, runtime_extrapolated=True,
             tokens_per_s=939.0, steady_tokens_per_s=20040.0, compile_s=12.5, warmup_s=12.9, mean_loss=11.18)
    line = progress_line(1, 1, r)
    assert "20040 tok/s steady (compile 12.5 s)" in line and "939 tok/s" not in line
    r.update(compile_steps_after_warmup=1)
    assert "20040 tok/s steady (compile 12.5 s, 1 later step(s) compiled, not counted)" in progress_line(1, 1, r)
    r.update(steady_tokens_per_s=None)
    assert "939 tok/s" in progress_line(1, 1, r)


def test_a_packed_cell_counts_records_not_rows():
    """Packing puts several records in a row: the cell consumed every record (not "stopped early"
    and extrapolated), and the planner's prediction is for the rows that ran."""
    spec = CellSpec(model="tiny", samples=8, seq_len=512, micro_batch=4, data="alpaca-sample", precision="bf16",
                    device="cpu", packing="on", warmup_steps=0)
    r = run_cell(spec)
    assert r["status"] == "ok", r["error"]
    assert r["samples_done"] == 8 and not r.get("runtime_extrapolated")
    assert r["runtime_s"] == r["runtime_measured_s"]
    assert 1 <= r["max_rows_seen"] < 4  # 4 records (~100-300 tokens) fit in fewer rows of 512
    assert (r["predicted"]["batch"], r["predicted"]["seq_len"]) == (r["max_rows_seen"], r["max_seq_len_seen"])


def test_an_fp8_or_int8_base_is_compared_with_the_16bit_reference():
    """HF + PEFT has no fp8/int8 LoRA trainer: the reference of such a cell trains the 16-bit base
    (nf4 keeps bitsandbytes), the report says so, and an HF cell asked for int8/fp8 itself is refused."""
    for q in ("fp8", "int8"):
        spec = CellSpec(model="tiny", quantize=q)
        assert cellmod.reference_gap(spec) is None
        assert spec.as_reference("hf").quantize == "none"
        assert reference_differs(spec.to_dict()) == [f"quantize {q} (its reference: the 16-bit base)"]
        with pytest.raises(ConfigError, match=q):
            CellSpec(impl="hf", quantize=q)
    assert CellSpec(model="tiny", quantize="nf4").as_reference("hf").quantize == "nf4"
    assert CellSpec(model="tiny", quantize="fp8").method_name == "fp8-lora"
