"""Every benchmark writes its latest results into bench/README.md with ``--readme``: the writer
(bench/readme_section.py) replaces only its section, every benchmark has the flag and its one
pair of markers, and each renderer turns a small fabricated result into the table rows and the
sentences the README holds now, in the same shape (a run replaces like with like). No benchmark
runs here: they take minutes."""

from __future__ import annotations

import ast
import datetime
import importlib
import re
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from bench import api_load, durable, loss_memory, ranks, readme_section, sampling, served
from bench.loadgen import LoadResult
from bench.readme_section import README, markers, write_section

BENCH = Path(api_load.__file__).parent
# module -> the names of its README sections (trainer_sdk has one per --model)
SECTIONS = {
    "api_load": ["api_load"],
    "loss_memory": ["loss_memory"],
    "ranks": ["ranks"],
    "durable": ["durable"],
    "sampling": ["sampling"],
    "served": ["served"],
    "trainer_sdk": ["trainer_sdk.tiny", "trainer_sdk.bench"],
    "gpu_trainer": ["gpu_trainer"],
}
# modules with a main that keep no table in the README: the API server process bench.api_load
# starts, and the one-line A/B probe of the op path (it compares two checkouts run by hand)
NOT_BENCHMARKS = {"serve", "small_ops"}
MACHINE = "2 CPUs (AMD EPYC 7B13, x86_64), Python 3.11.7, load average 0.50"


def section(name: str, text: str | None = None) -> str:
    """The text between ``name``'s markers (of bench/README.md unless ``text`` is given)."""
    begin, end = markers(name)
    text = README.read_text() if text is None else text
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def tables(body: str) -> list[list[str]]:
    """Each markdown table of ``body``: its lines."""
    out: list[list[str]] = []
    previous = ""
    for line in body.splitlines():
        if line.startswith("|") and previous.startswith("|"):
            out[-1].append(line)
        elif line.startswith("|"):
            out.append([line])
        previous = line
    return out


def shape(body: str) -> list[tuple[str, str, list[str]]]:
    """What a run must keep for its section to replace like with like: each table's header,
    separator and first column."""
    return [(t[0], t[1], [row.split("|")[1].strip() for row in t[2:]]) for t in tables(body)]


# ---- the writer -------------------------------------------------------------------------------


def test_write_section_replaces_only_its_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    before = "# Benchmarks\n\nintro, kept as is  \n\n<!-- bench.a: begin -->\n### Latest results (old)\n\n| x |\n"
    middle = "<!-- bench.a: end -->\n\nprose between\n\n<!-- bench.b: begin -->\nb's old\n<!-- bench.b: end -->\n"
    readme.write_text(before + middle + "tail without newline")
    write_section("a", "\n### Latest results (new)\n\n| y |\n\n", readme)
    assert readme.read_text() == (
        "# Benchmarks\n\nintro, kept as is  \n\n<!-- bench.a: begin -->\n### Latest results (new)\n\n| y |\n"
        "<!-- bench.a: end -->\n\nprose between\n\n<!-- bench.b: begin -->\nb's old\n<!-- bench.b: end -->\n"
        "tail without newline"
    )
    write_section("b", "b's new", readme)
    assert section("b", readme.read_text()) == "b's new"
    assert section("a", readme.read_text()) == "### Latest results (new)\n\n| y |"


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all\n",
        "<!-- bench.a: begin -->\nonly the beginning\n",
        "only the end\n<!-- bench.a: end -->\n",
        "<!-- bench.a: end -->\nreversed\n<!-- bench.a: begin -->\n",
        "<!-- bench.a: begin -->\none\n<!-- bench.a: end -->\n<!-- bench.a: begin -->\ntwo\n<!-- bench.a: end -->\n",
        "<!-- bench.b: begin -->\nanother benchmark's\n<!-- bench.b: end -->\n",
    ],
)
def test_write_section_refuses_a_readme_without_one_pair_of_markers(tmp_path: Path, text: str) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(SystemExit, match=r"bench\.a"):
        write_section("a", "new", readme)
    assert readme.read_text() == text  # nothing appended, nothing lost


# ---- every benchmark has --readme and one section -----------------------------------------------


def test_every_benchmark_with_a_main_is_known() -> None:
    """A new benchmark gets its --readme and its section (or is named here as no benchmark)."""
    with_main = {
        path.stem
        for path in BENCH.glob("*.py")
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(path.read_text()).body)
    }
    assert with_main == set(SECTIONS) | NOT_BENCHMARKS


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_benchmark_has_a_readme_flag(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"bench.{name}")
    if hasattr(module, "parser"):
        help_text = module.parser().format_help()
    else:  # trainer_sdk and gpu_trainer build theirs in main
        with pytest.raises(SystemExit) as exit_:
            module.main(["--help"])
        assert exit_.value.code == 0
        help_text = capsys.readouterr().out
    assert re.search(r"^\s+--readme\b", help_text, re.MULTILINE), help_text


@pytest.mark.parametrize("name", [s for names in SECTIONS.values() for s in names])
def test_the_readme_has_one_section_per_benchmark(name: str) -> None:
    text = README.read_text()
    begin, end = markers(name)
    assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end)
    assert section(name)


def test_the_readme_names_readme_in_each_usage_line() -> None:
    usage = re.findall(r"^## .*`python -m bench\.(\w+) ([^`]*)`", README.read_text(), re.MULTILINE)
    assert {name for name, _ in usage} == set(SECTIONS)
    assert all("[--readme]" in flags for _, flags in usage), usage


# ---- the renderers, on fabricated results ----------------------------------------------------


def loss_memory_report(lean_peak_mib: float = 1078.0) -> loss_memory.MemoryReport:
    figures = {  # peak MiB, median step s
        "full logits, glibc": (3198.0, 2.910),
        "full logits, jemalloc": (2607.0, 2.072),
        "chunked, jemalloc": (1650.0, 2.451),
        "chunked + checkpointing, glibc": (1755.0, 4.354),
        "chunked + checkpointing, malloc thresholds": (939.0, 6.342),
        "chunked + checkpointing, jemalloc": (lean_peak_mib, 3.089),
    }
    assert list(figures) == list(loss_memory.MODES)
    modes = {name: loss_memory.ModeFigures(peak, peak, step) for name, (peak, step) in figures.items()}
    return loss_memory.MemoryReport("2026-12-06", False, MACHINE, 1.5, 2, 5, modes)


def test_loss_memory_renders_its_table_and_the_target() -> None:
    body = loss_memory.render(loss_memory_report())
    assert body.startswith("### Latest results (2026-12-06)\n\n" + MACHINE + " at start, 1.50 at the end; 2 rounds")
    readme = section("loss_memory")
    for row in (  # the numbers behind the recorded run come out as the README has them
        "| full logits, glibc (baseline) | 3,198 MiB | 100% | 2.910 s | 100% |",
        "| full logits, jemalloc (**default at this batch**) | 2,607 MiB | 82% | 2.072 s | 71% |",
        "| chunked + checkpointing, jemalloc | 1,078 MiB | **34%** | 3.089 s | 106% |",
    ):
        assert row in body.splitlines() and row in readme.splitlines()
    assert "reaches the 40% target (34%) at 6% more step time than the baseline" in body
    assert "at this batch it is 49% slower than the default." in body
    assert shape(body) == shape(readme)
    assert "misses the 40% target (44%)" in loss_memory.render(loss_memory_report(1400.0))


def test_loss_memory_shows_both_peaks_when_they_differ() -> None:
    report = loss_memory_report()
    first = next(iter(report.modes))
    report.modes[first] = loss_memory.ModeFigures(3198.0, 2900.0, 2.910)
    body = loss_memory.render(report)
    assert "| mode | peak RSS, whole process / steps only |" in body
    assert "| full logits, glibc (baseline) | 3,198 / 2,900 MiB | 100% |" in body


def test_ranks_renders_every_ranks_figures() -> None:
    one = [{"step_s": 2.156, "steps_peak_mib": 2606.0, "life_peak_mib": 2606.0, "base_mib": 31.4}]
    two = [
        {"step_s": 2.103, "steps_peak_mib": 1618.0, "life_peak_mib": 1618.0, "base_mib": 17.4},
        {"life_peak_mib": 1617.0, "base_mib": 17.4},
    ]
    body = ranks.render(ranks.RanksReport("2026-12-06", True, MACHINE, 1.8, 2, {1: one, 2: two}))
    assert body.startswith("### Latest results (2026-12-06, --quick)\n")
    assert "at the end. 32 × 256 tokens, LoRA rank 32, 2 measured steps" in body
    readme = section("ranks")
    for row in (
        "| 1 | 2.156 s | 100% | 2,606 MiB | 2,606 MiB | 31.4 MiB |",
        "| 2 | 2.103 s | 98% | 1,618 MiB | 1,618 / 1,617 MiB | 17.4 / 17.4 MiB |",
    ):
        assert row in body.splitlines() and row in readme.splitlines()
    assert shape(body) == shape(readme)


def durable_report(replayed_s: float = 0.0, losses_off: float = 100.0) -> durable.DurableReport:
    blocks = []
    # round by round, the every-step side's typical step against 3.148 s (the off side's is 3.181 s);
    # each block has one slow step
    for drift in (-0.09, -0.02, 0.0, 0.0, 0.0, 0.05):
        on = durable.Block(durable.EVERY_STEP, [3.148 * (1 + drift)] * 3 + [3.7], 3254.4, [100.0] * 5)
        off = durable.Block(durable.OFF, [3.181] * 3 + [3.5], 3191.6, [losses_off] * 5)
        blocks += [on, off]
    stats = durable.WorkerStats([14_335_440] * 30, [0.052] * 26 + [0.071] * 4, [3.11] * 24)

    def recovery(first: str, parts: list[float]) -> durable.Recovery:
        names = [
            first,
            "new trainer process started",
            "Python start + base model loaded",
            "run restored from its snapshot",
            f"ops replayed ({'2' if parts[4] else 'none'} here)",
            "the `forward_backward` itself",
            "result reaches the client",
        ]
        return durable.Recovery(sum(parts), dict(zip(names, parts)))

    kills = [
        recovery("controller notices the death", [0.87, 0.28, 4.15, 0.19, replayed_s, 3.07 + e, 0.0])
        for e in (0.0, -0.08, 0.55)
    ]
    wakes = [
        recovery("the op wakes the deployment", [0.01, 0.02, 4.08, 0.19, 0.0, 3.13 + e, 0.0]) for e in (0.0, -0.1, 0.15)
    ]
    return durable.DurableReport("2026-12-06", False, MACHINE, 1.32, 6, 4, blocks, stats, "14335440", kills, wakes)


def test_durable_renders_its_table_the_target_and_the_kill() -> None:
    body = durable.render(durable_report())
    readme = section("durable")
    assert body.startswith(
        "### Latest results (2026-12-06)\n\n" + MACHINE + " at start, 1.32 at the end. 6 rounds of 4"
    )
    assert "3 kills, 3 wakes. Both runs' losses were identical step for step." in body
    for row in (
        "| step, snapshots off (only after seq 0): median / p90 | 3.181 / 3.500 s |",
        "| step, a snapshot every step: median / p90 | 3.148 / 3.700 s |",
        "| added per step, a snapshot every step | -1.0% (-0.033 s); per round -1.0% (-9.9 to +3.9) |",
        "| snapshot: size / own duration median (p90), 30 over 30 steps | 13.67 MiB / 0.052 s (0.071 s) |",
        "| default policy (every 64 ops or 60 s: every 18.9 steps here), amortised | -0.05% (all of the snapshot's "
        "own duration on the step: +0.09%) |",
        "| trainer peak RSS (VmHWM per block), snapshots off / every step | 3,192 / 3,254 MiB (+63) |",
        "| for comparison: a `forward_backward` in the blocks (worker log), median | 3.11 s |",
        "| SIGKILL during `forward_backward` → its result in the client, median of 3 (range) | 8.6 s (8.5–9.1) |",
        "| &nbsp;&nbsp;controller notices the death | 0.87 s |",
        "| &nbsp;&nbsp;ops replayed (none here) | 0.00 s |",
        "| &nbsp;&nbsp;the `forward_backward` itself | 3.07 s |",
        "| scaled to zero: `forward_backward` submitted → its result, median of 3 (range) | 7.4 s (7.3–7.6) |",
    ):
        assert row in body.splitlines(), row
    for row in (  # as the README has them
        "| snapshot: size / own duration median (p90), 30 over 30 steps | 13.67 MiB / 0.052 s (0.071 s) |",
        "| trainer peak RSS (VmHWM per block), snapshots off / every step | 3,192 / 3,254 MiB (+63) |",
        "| &nbsp;&nbsp;controller notices the death | 0.87 s |",
    ):
        assert row in readme.splitlines(), row
    assert "Target: ≤ 3% added per step at the default policy, met. Even a snapshot every step costs less" in body
    assert "the medians differ by -1.0% and single rounds by -10% to +4%" in body
    assert "(0.052 s of a 3.18 s step: at most +1.6% every step, +0.09% at the default policy, where the 60 s" in body
    assert "The run-state hash agreed with the worker's log (last snapshot 14,335,440 bytes)." in body
    assert "The snapshot adds 63 MiB (2%) to the trainer's 3.1 GiB peak, about 4.6× its size" in body
    assert "A kill costs the op in flight ~5.5 s more than it would have taken" in body
    assert "a fresh Python process with torch and the base model (4.4 s), the restore (0.19 s), then the op" in body
    assert "Nothing was replayed here" in body
    assert "Waking from zero is the same path without the detection: 7.4 s, of which the op itself 3.1 s." in body
    assert shape(body) == shape(readme)


def test_durable_says_when_ops_were_replayed_or_the_losses_differ() -> None:
    body = durable.render(durable_report(replayed_s=1.5, losses_off=100.5))
    assert "the replay of the ops since the snapshot (1.50 s)" in body and "Nothing was replayed" not in body
    assert "A kill costs the op in flight ~7.0 s more" in body
    assert "The runs' losses differ: by up to 5.0e-03 relative." in body


def sampling_report(sdk_s: float = 4.0) -> sampling.SamplingReport:
    direct = [3.5, 4.0, 3.8, 3.7]  # seconds for 64 x 64 tokens: 1,170 .. 1,024 tokens/s
    return sampling.SamplingReport(
        date="2026-11-24",
        model="tiny",
        machine=MACHINE,
        end_load=1.1,
        cold_start_s=55.2,
        round_s={
            "direct": direct,
            "openloops_http": [t / 0.95 for t in direct],
            "openloops_sdk": [sdk_s] * len(direct),
        },
        saves_s=[0.033, 0.030, 0.040],
        first_sample_s=[0.685, 0.7, 0.6],
        next_sample_s=[0.108, 0.1, 0.2],
        save_and_sample_s=[0.667, 0.6, 0.7],
    )


def test_sampling_renders_its_table_and_the_target() -> None:
    body = sampling.render(sampling_report())
    assert body.startswith("### Latest results (2026-11-24, tiny model, 4 rounds)\n\n" + MACHINE + " at start, 1.10")
    for row in (
        "| sampler cold start (vLLM start included) | 55 s |",
        "| 64 × 64 tokens straight to vLLM | 1,092 tok/s |",
        "| through openloops, `asample` + `retrieve_future` over HTTP | 1,038 tok/s (0.95; per round 0.95) |",
        "| through openloops with the unmodified tinker SDK (client on the same cores) | 1,024 tok/s (0.94; "
        "per round 0.94) |",
        "| `save_weights_for_sampler` | 33 ms |",
        "| first sample on those weights, 8 tokens | 685 ms |",
        "| next sample on the same weights, 8 tokens | 108 ms |",
        "| `save_weights_and_get_sampling_client()` + first sample, 8 tokens | 667 ms |",
    ):
        assert row in body.splitlines(), row
    assert "Target: ≥ 0.9 of direct vLLM throughput through openloops (per round): met over HTTP, met through" in body
    assert "Single rounds ranged 973–1,170 tokens/s." in body
    assert shape(body) == shape(section("sampling"))
    assert "met over HTTP, not met through the SDK" in sampling.render(sampling_report(sdk_s=5.0))


def served_report(ttft_added_s: float = 0.002) -> served.ServedReport:
    direct = [1.2, 1.0, 1.1]
    return served.ServedReport(
        date="2026-12-06",
        quick=True,
        machine=MACHINE,
        end_load=2.03,
        cold_start_s=34.7,
        round_s={"direct": direct, "openloops": [t / 0.93 for t in direct]},
        api_cpu_ms={"direct": 0.56, "openloops": 1.32},
        ttft_s={
            "direct": [0.0924, 0.09, 0.1164, 0.095],
            "openloops": [x + ttft_added_s for x in (0.0924, 0.09, 0.1164, 0.095)],
        },
    )


def test_served_renders_its_table_and_the_targets() -> None:
    body = served.render(served_report())
    assert body.startswith("### Latest results (2026-12-06, tiny model, 3 rounds, --quick)\n\n" + MACHINE)
    for row in (
        "| cold start: deploy → ACTIVE (own vLLM server started, adapter loaded) | 34.7 s |",
        "| 64 × 64 tokens straight to vLLM | 3,724 tok/s |",
        "| through openloops (`base_url` `/completions`, checkpoint name) | 3,463 tok/s (0.93; per round 0.93) |",
        "| single rounds, direct / through openloops | 3,413–4,096 / 3,174–3,809 tok/s |",
        "| CPU of the openloops process per proxied request (during the direct rounds: its controller) "
        "| 1.32 ms (0.56 ms) |",
        "| time to first token straight to vLLM, p50 / p90 | 95.0 / 116.4 ms |",
        "| through openloops, p50 / p90 | 97.0 / 118.4 ms |",
        "| added time to first token, p50 | +2.0 ms |",
    ):
        assert row in body.splitlines(), row
    assert "Targets: ≥ 0.9 of direct throughput and added time to first token p50 < 5 ms, both met" in body
    assert shape(body) == shape(section("served"))
    late = served.render(served_report(ttft_added_s=0.008))
    assert "throughput met; time to first token not met (per round 0.93, +8.0 ms)" in late


def load(rps: float, p50_ms: float, p99_ms: float, *, cpu: float = 0.3, errors: int = 0) -> LoadResult:
    return LoadResult(round(rps * 15), 15.0, errors, p50_ms, p99_ms, 2 * p99_ms, "wrk", cpu, 1)


def api_load_report(real_p99_ms: float = 13.4, generator_cpu: float = 0.3) -> api_load.ApiLoadReport:
    row = api_load.ThroughputRow
    throughput = [
        row("bare Litestar, static JSON (ceiling)", load(11820, 5.4, 7.8), False),
        row("`GET /v1/loops/runs/{id}` (authenticated)", load(7044, 8.9, real_p99_ms, cpu=generator_cpu), True),
        row("`GET /v1/loops/checkpoints?run_id=` (authenticated, 20 checkpoints)", load(6840, 9.2, 14.0), True),
        row("`GET /v1/loops/runs/{id}`, read cache off", load(3079, 18.6, 214.4), False),
        row("`GET /v1/loops/checkpoints?run_id=`, read cache off", load(1978, 31.1, 187.0, errors=3), False),
    ]
    tenant = api_load.Tenant("org", "user", "key", "run", "ckpt", "bt://loops:run/sampler_weights/x")
    points = [
        api_load.ListPoint(label, size, load(1000, p50, p50), sql, "Index Scan x")
        for label, *_ in api_load.list_routes(tenant)
        for size, p50, sql in ((100, 0.68, 0.05), (1000, 0.7, 0.06), (100_000, 0.81, 0.08))
    ]
    return api_load.ApiLoadReport("2026-11-24", False, MACHINE, 0.8, 64, 15.0, 3.0, True, throughput, points)


def test_api_load_renders_both_tables_and_the_targets() -> None:
    body = api_load.render(api_load_report())
    readme = section("api_load")
    assert body.startswith("### Latest results (2026-11-24)\n\n" + MACHINE + " at start, 0.80 at the end;")
    assert "(`wrk`) share these cores. 64 connections, 15 s per target after 3 s of warm-up." in body
    for row in (
        "| bare Litestar, static JSON (ceiling) | 11,820 | 5.4 | 7.8 | 100% |",
        "| `GET /v1/loops/runs/{id}` (authenticated) | 7,044 | 8.9 | 13.4 | 60% |",
        "| `GET /v1/loops/checkpoints?run_id=` (authenticated, 20 checkpoints) | 6,840 | 9.2 | 14.0 | 58% |",
        "| `GET /v1/loops/checkpoints?run_id=`, read cache off | 1,978 | 31.1 | 187.0 | 17% |",
    ):
        assert row in body.splitlines() and row in readme.splitlines(), row
    assert "| `GET /v1/loops/checkpoints?run_id=` | 0.68 → 0.81 | 0.05 → 0.08 |" in body.splitlines()
    assert "| route | HTTP p50 ms, 100 → 100k rows | SQL ms, 100 → 100k rows |" in body.splitlines()
    assert "grows from 100 to 100,000 rows" in body
    assert "Errors (non-2xx or socket): `GET /v1/loops/checkpoints?run_id=`, read cache off 3." in body
    assert (
        "Targets: ≥ 50% of the bare app and p99 < 25 ms at 64 connections, met as configured by default "
        "(lowest 58%, highest p99 14.0 ms)." in body
    )
    assert shape(body) == shape(readme)
    assert "not met as configured by default (lowest 58%, highest p99 30.0 ms)" in api_load.render(
        api_load_report(real_p99_ms=30.0)
    )


def test_api_load_gives_no_ratio_where_the_generator_set_the_pace() -> None:
    body = api_load.render(api_load_report(generator_cpu=0.95))
    assert "| `GET /v1/loops/runs/{id}` (authenticated) | 7,044 | 8.9 | 13.4 | n/a |" in body.splitlines()
    assert "was the bottleneck for: `GET /v1/loops/runs/{id}` (authenticated)" in body
    assert "not measured as configured by default (the load generator set the pace)" in body


def test_short_counts() -> None:
    assert [api_load.short_count(n) for n in (100, 1000, 10_000, 100_000, 1500)] == [
        "100",
        "1k",
        "10k",
        "100k",
        "1,500",
    ]


RENDERED = {
    "api_load": lambda: api_load.render(api_load_report()),
    "loss_memory": lambda: loss_memory.render(loss_memory_report()),
    "ranks": lambda: ranks.render(
        ranks.RanksReport("2026-12-06", False, MACHINE, 1.0, 5, {1: [_rank()], 2: [_rank(), _rank()]})
    ),
    "durable": lambda: durable.render(durable_report()),
    "sampling": lambda: sampling.render(sampling_report()),
    "served": lambda: served.render(served_report()),
}


def _rank() -> dict[str, float]:
    return {"step_s": 2.0, "steps_peak_mib": 1600.0, "life_peak_mib": 1600.0, "base_mib": 17.4}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_a_run_replaces_its_section_like_with_like(name: str, tmp_path: Path) -> None:
    """Written into a copy of bench/README.md, a rendered section replaces the recorded one (a
    "### Latest results" subsection with the same tables) and nothing else."""
    module: ModuleType = importlib.import_module(f"bench.{name}")
    assert hasattr(module, "render")
    original = README.read_text()
    assert section(name, original).startswith("### Latest results (")
    copy = tmp_path / "README.md"
    copy.write_text(original)
    body = RENDERED[name]()
    write_section(name, body, copy)
    written = copy.read_text()
    assert section(name, written) == body.strip()
    begin, end = markers(name)
    assert written.split(begin)[0] == original.split(begin)[0]
    assert written.split(end)[1] == original.split(end)[1]
    assert [t[:2] for t in tables(body)] == [t[:2] for t in tables(section(name, original))]


# ---- main --readme, the measurements replaced by fabricated ones ------------------------------


@pytest.fixture
def readme_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of bench/README.md that the benchmarks' publish writes instead; the models
    are not built."""
    copy = tmp_path / "README.md"
    copy.write_text(README.read_text())
    monkeypatch.setattr(readme_section, "README", copy)
    monkeypatch.setattr("control_plane.local_mode.models.prepare", lambda kind, root, quiet: SimpleNamespace(source=""))
    return copy


def test_loss_memory_main_prints_the_machine_and_writes_its_section(
    readme_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run_mode(model_dir: str, mode: tuple[int, str, str], steps: int) -> dict:
        peak = 3000.0 if mode[0] == 0 else 1000.0
        return {"life_peak_mib": peak, "steps_peak_mib": peak, "step_s": 2.0, "losses": [10.0] * 3, "vocab": 8192}

    monkeypatch.setattr(loss_memory, "run_mode", run_mode)
    assert loss_memory.main(["--quick", "--readme"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and " CPUs (" in out.splitlines()[0]
    body = section("loss_memory", readme_copy.read_text())
    assert body.startswith(f"### Latest results ({datetime.date.today().isoformat()}, --quick)\n")
    assert "| chunked + checkpointing, jemalloc | 1,000 MiB | **33%** | 2.000 s | 100% |" in body.splitlines()
    assert body in out
    assert README.read_text() != readme_copy.read_text()


def test_ranks_main_prints_the_machine_and_writes_its_section(
    readme_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(model_dir: str, n: int, steps: int) -> dict:
        lead = {"step_s": 2.0, "steps_peak_mib": 2600.0 / n, "life_peak_mib": 2600.0 / n, "losses": [10.0] * 3}
        return {
            "ranks": [{**lead, "base_mib": 31.4 / n}] + [{"life_peak_mib": 2600.0 / n, "base_mib": 31.4 / n}] * (n - 1)
        }

    monkeypatch.setattr(ranks, "run", run)
    assert ranks.main(["--readme"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    body = section("ranks", readme_copy.read_text())
    assert body.startswith(f"### Latest results ({datetime.date.today().isoformat()})\n")
    assert "| 2 | 2.000 s | 100% | 1,300 MiB | 1,300 / 1,300 MiB | 15.7 / 15.7 MiB |" in body.splitlines()
    assert body in out


def test_the_small_ops_probe_summarises_its_rounds_and_refuses_bad_counts() -> None:
    from bench.small_ops import main, summary

    line = summary([0.010, 0.012, 0.011, 0.030, 0.009], [0.5, 0.4, 0.6])
    assert "p50 11.00 ms" in line and "p90 30.00 ms" in line and "(5 rounds)" in line
    assert "step median 0.500 s (3 steps)" in line
    assert "step median not measured (0 steps)" in summary([0.01], [])
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        main(["--rounds", "0"])
