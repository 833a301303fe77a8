"""The end-to-end harness's bookkeeping rules, on made-up pass results (no processes run).

The p99-at-100-connections bar is judged on steal-free passes only (see ``CALM_STEAL`` in
``bench/e2e/run.py`` and bench/RESULTS.md); these tests pin down which passes count, when the
harness refuses to judge, and whose CPU a pass's steal is read from.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

_spec = importlib.util.spec_from_file_location(
    "e2e_run", Path(__file__).resolve().parent / "e2e" / "run.py"
)
assert _spec is not None and _spec.loader is not None
run = importlib.util.module_from_spec(_spec)
sys.modules["e2e_run"] = run
_spec.loader.exec_module(run)


def lat100(*passes: tuple[float, float]) -> list[dict[str, Any]]:
    """(p99 µs, steal share on the proxy's CPU) per pass."""
    return [{"p99": p99, "p50": p99 / 3, "steal_proxy": steal} for p99, steal in passes]


def p99_verdict(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    lines = run.verdicts(run.summarize(results), results)
    (line,) = [x for x in lines if "p99 @100" in x]
    return line


def test_the_p99_bar_pairs_steal_free_passes_and_asks_for_a_difference_beyond_the_noise(
) -> None:
    # gaia is worse over all passes only because its stalled passes were worse; the pairs
    # with a stalled pass (the 4th and 5th) are left out of the bar
    gaia = lat100((600, 0.0), (620, 0.0), (640, 0.004), (9000, 0.03), (8000, 0.02),
                  (500, 0.0), (700, 0.0), (690, 0.0), (560, 0.0), (610, 0.0), (580, 0.0),
                  (650, 0.0))
    nginx = lat100((650, 0.0), (700, 0.0), (660, 0.0), (700, 0.01), (680, 0.0),
                   (520, 0.0), (690, 0.0), (600, 0.0), (570, 0.0), (600, 0.0), (620, 0.0),
                   (640, 0.0))
    results = {"gaia-uvloop": {"lat100": gaia}, "nginx": {"lat100": nginx}}
    s = run.summarize(results)
    assert (s["gaia-uvloop"]["n_100_calm"], s["gaia-uvloop"]["n_100"]) == (10, 12)
    assert s["gaia-uvloop"]["p99_100_calm"] == 615
    assert s["nginx"]["n_100_calm"] == 11
    pairs = run.paired_p99(results, "gaia-uvloop", "nginx")
    assert pairs == pytest.approx([600 / 650, 620 / 700, 640 / 660, 500 / 520, 700 / 690,
                                   690 / 600, 560 / 570, 610 / 600, 580 / 620, 650 / 640])
    line = p99_verdict(results)
    assert line.startswith("- p99 @100 conns no worse than nginx's, paired steal-free passes: "
                           "**met** — median of 10 pairs ×0.98, 95 % interval 0.92-1.02 "
                           "(reaches 1: this run cannot tell them apart); gaia's p99 above "
                           "nginx's in 4 of 10; "), line
    assert "medians of the steal-free passes 615.0 vs 640.0 µs (×0.96, 10 / 11 passes)" in line
    assert "all passes 630.0 vs 645.0 µs" in line, line

    # every pair 10 % slower: the interval lies above 1
    calm = [x["p99"] for x in nginx if x["steal_proxy"] == 0.0]
    nginx_calm = lat100(*((x, 0.0) for x in calm))
    gaia_slow = lat100(*((x * 1.1, 0.0) for x in calm))
    line = p99_verdict({"gaia-uvloop": {"lat100": gaia_slow}, "nginx": {"lat100": nginx_calm}})
    assert "**NOT met** — median of 11 pairs ×1.10, 95 % interval 1.10-1.10 (above 1: gaia is " \
        "slower)" in line, line
    # and every pair 10 % faster: met, and the interval says which way
    gaia_fast = lat100(*((x * 0.9, 0.0) for x in calm))
    line = p99_verdict({"gaia-uvloop": {"lat100": gaia_fast}, "nginx": {"lat100": nginx_calm}})
    assert "**met** — median of 11 pairs ×0.90, 95 % interval 0.90-0.90 (below 1: gaia is " \
        "faster)" in line, line


def test_too_few_steal_free_pairs_is_said_not_judged() -> None:
    gaia = lat100((600, 0.0), (620, 0.0), (5000, 0.02), *[(600, 0.0)] * 8)
    nginx = lat100((650, 0.0), (7000, 0.03), (8000, 0.05), *[(600, 0.0)] * 8)
    line = p99_verdict({"gaia-uvloop": {"lat100": gaia}, "nginx": {"lat100": nginx}})
    assert ("**not measurable in this run**: 9 pairs of steal-free passes (10 wanted)"
            in line), line
    assert "met" not in line.replace("measurable", ""), line


def test_without_nginx_the_p99_bar_is_not_measured() -> None:
    gaia = lat100((600, 0.0), (620, 0.0), (640, 0.0))
    line = p99_verdict({"gaia-uvloop": {"lat100": gaia}})
    assert line.startswith("- p99 @100 conns no worse than nginx's, paired steal-free passes: "
                           "not measured"), line


def test_the_interval_of_the_median_is_the_binomial_one() -> None:
    assert run.median_interval([1.0] * 5) is None  # 2 * 0.5**5 > 0.05: no 95 % interval
    assert run.median_interval([5, 1, 4, 2, 6, 3]) == (1, 6)  # 2 * 0.5**6 = 0.031
    # 22 values: P(at most 5 below) = 0.0085, P(at most 6 below) = 0.026 > 0.025
    assert run.median_interval([float(x) for x in range(22)]) == (5.0, 16.0)


def test_steal_and_foreign_load_are_read_from_the_proxys_cpu() -> None:
    def window(**over: Any) -> dict[str, Any]:
        r = {
            "cpu_busy": {"cpu0": 0.50, "cpu1": 0.70},
            "cpu_steal": {"cpu0": 0.03, "cpu1": 0.01},
            "proxy_cpu_util": 0.30,
            "backend_cpu_util": 0.20,
            "loadgen_cpu_util": 0.40,
        }
        r.update(over)
        return r

    gaia, direct = run.Target("gaia-uvloop"), run.Target("direct")

    r = window()  # the usual pinning: the proxy alone on CPU 0
    run.add_foreign_load(r, gaia, 0)
    assert r["steal_proxy"] == 0.03
    assert r["foreign_cpu"] == pytest.approx({"cpu0": 0.50 - 0.30, "cpu1": 0.70 - 0.60})

    # --proxy-cpu 1: everything of ours is on CPU 1, so CPU 0's load is someone else's
    r = window(cpu_busy={"cpu0": 0.50, "cpu1": 0.95})
    run.add_foreign_load(r, gaia, 1)
    assert r["steal_proxy"] == 0.01
    assert r["foreign_cpu"]["cpu0"] == 0.50
    assert r["foreign_cpu"]["cpu1"] == pytest.approx(0.95 - 0.30 - 0.60)

    r = window()  # direct has no proxy: a stall on either CPU counts
    run.add_foreign_load(r, direct, 0)
    assert r["steal_proxy"] == 0.03

    r = window()  # unpinned: the worst CPU
    run.add_foreign_load(r, gaia, None)
    assert r["steal_proxy"] == 0.03
    assert set(r["foreign_cpu"]) == {"all"}


def test_latency_passes_per_rep() -> None:
    assert run.lat_passes(run.FULL, "lat1") == (3, 3)
    assert run.lat_passes(run.FULL, "lat100") == (4, 1)
    assert run.lat_passes(run.QUICK, "lat1") == (1, 1)
    assert run.lat_passes(run.QUICK, "lat100") == (1, 1)


def saved_run(path: Path, git: str, cpu64: tuple[float, float], hs_cpu: float,
              p99s: tuple[tuple[tuple[float, float], ...], tuple[tuple[float, float], ...]],
              python: str = "/usr/bin/python3.11, Python 3.11.2 (libpython linked in)") -> str:
    """A --json file as run.py writes it, with only the fields the bars read."""
    gaia_p99, nginx_p99 = p99s
    results = {
        "gaia-uvloop": {"tput64": [{"cpu_us_per_msg": cpu64[0]}],
                        "connect": [{"cpu_ms_per_handshake": hs_cpu}],
                        "lat100": lat100(*gaia_p99)},
        "nginx": {"tput64": [{"cpu_us_per_msg": cpu64[1]}],
                  "connect": [{"cpu_ms_per_handshake": 0.3}],
                  "lat100": lat100(*nginx_p99)},
    }
    path.write_text(json.dumps({
        "machine": {"git": git, "date": "2026-11-26 08:00 UTC", "loadavg": "1 1 1",
                    "proxy_python": python},
        "elapsed_s": 580, "results": results,
    }))
    return str(path)


def test_over_runs_judges_the_median_and_pools_the_paired_passes(tmp_path: Path) -> None:
    calm = ((600, 0.0), (620, 0.0))  # two steal-free passes a run: no run judges p99 alone
    paths = [
        saved_run(tmp_path / "a.json", "abc1234", (4.0, 2.5), 1.06,
                  (calm + ((9000, 0.03),), ((650, 0.0), (660, 0.0)))),
        saved_run(tmp_path / "b.json", "abc1234", (3.6, 2.5), 0.95,
                  (calm, ((640, 0.0), (5000, 0.02)))),
        saved_run(tmp_path / "c.json", "abc1234", (3.5, 2.5), 0.97, (calm, ((700, 0.0),))),
    ]
    text = run.over_runs(paths)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()
            if line.startswith("| ")}
    # 64 B: 1.60, 1.44, 1.40 -> median 1.44, met although one run was over the bar
    assert rows["CPU/msg 64 B ≤ 1.5× nginx"].endswith(
        "| 1.60 | 1.44 | 1.40 | 1.44 | **met** (3 runs) |"), rows
    assert rows["handshake ≤ 1 ms proxy CPU"].endswith(
        "| 1.060 | 0.950 | 0.970 | 0.970 | **met** (3 runs) |")
    # pairs of steal-free passes: none in the first and third runs (gaia and nginx have
    # different numbers of passes there, so they do not line up), one in the second
    assert rows["p99 @100 conns no worse than nginx's, paired steal-free passes"].endswith(
        "| — | — | — | — | judged on the pooled pairs, below |")
    assert ("paired steal-free passes, pooled over the runs: **not measurable in these runs**: "
            "1 pair of steal-free passes (10 wanted)") in text
    assert "different commits" not in text
    assert "The Python proxies ran on /usr/bin/python3.11, Python 3.11.2" in text

    # five pairs in each of two runs: ten, pooled; each pair 1.002, so the interval is above 1
    close = [saved_run(tmp_path / f"e{i}.json", "abc1234", (4.0, 2.5), 0.9,
                       (((622.6, 0.0),) * 5, ((621.5, 0.0),) * 5)) for i in range(2)]
    text = run.over_runs(close)
    assert ("pooled over the runs: **NOT met** — median of 10 pairs ×1.002, 95 % interval "
            "1.002-1.002 (above 1: gaia is slower)") in text, text
    # five pairs are too few for either run alone
    assert "| — | — | — | judged on the pooled pairs, below |" in text, text

    other = saved_run(tmp_path / "d.json", "def5678", (4.0, 2.5), 1.2, (calm, calm))
    assert "different commits (abc1234, def5678)" in run.over_runs(paths + [other])


def test_over_runs_accepts_commits_that_share_their_src_tree(tmp_path: Path) -> None:
    # A bench-only commit between two runs leaves src/ as it was: the same git tree.
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    full, short, tree = git("rev-parse", "HEAD"), git("rev-parse", "--short", "HEAD"), git(
        "rev-parse", "--short", "HEAD:src")
    calm = ((600, 0.0), (620, 0.0), (640, 0.0))
    paths = [saved_run(tmp_path / f"{i}.json", rev, (4.0, 2.5), 0.9, (calm, calm))
             for i, rev in enumerate((full, short))]
    text = run.over_runs(paths)
    assert f"all with the same `src/` (git tree {tree})" in text, text
    modified = saved_run(tmp_path / "m.json", f"{short} (src/ modified)", (4.0, 2.5), 0.9,
                         (calm, calm))
    assert "whose `src/` differs or is unknown here" in run.over_runs(paths + [modified])


def test_over_runs_flags_runs_of_different_interpreters(tmp_path: Path) -> None:
    calm = ((600, 0.0), (620, 0.0), (640, 0.0))
    paths = [saved_run(tmp_path / f"{i}.json", "abc1234", (4.0, 2.5), 0.9, (calm, calm),
                       python=py)
             for i, py in enumerate(("/usr/bin/python3.11, Python 3.11.2 (libpython linked in)",
                                     "/opt/py/bin/python, Python 3.11.7 (libpython shared)"))]
    text = run.over_runs(paths)
    assert "on different interpreters" in text, text
    assert "Python 3.11.7 (libpython shared)" in text

    # runs saved before --python existed name no interpreter: nothing is claimed for them
    for path in paths:
        saved = json.loads(Path(path).read_text())
        del saved["machine"]["proxy_python"]
        Path(path).write_text(json.dumps(saved))
    text = run.over_runs(paths)
    assert "Python proxies ran on" not in text, text
    assert "different interpreters" not in text, text


def test_python_build_describes_the_interpreter_it_runs() -> None:
    import platform

    text = run.python_build(sys.executable)
    assert text.startswith(f"{sys.executable}, Python {platform.python_version()} (")
    maps = Path("/proc/self/maps").read_text()
    assert ("libpython shared" if "/libpython" in maps else "libpython linked in") in text
    from gaia_gateway.core import SPEEDUPS

    assert text.endswith(f"; gaia's frame walk in {SPEEDUPS}")
    assert run.python_build("/nonexistent/python").endswith("(not runnable)")


def test_a_value_that_rounds_to_the_limit_shows_which_side_it_is_on() -> None:
    bar = run.Bar("p50", "added p50", 1.2546, 1.25, True, "detail")
    assert bar.line().startswith("- added p50: **NOT met** — 1.255 (≤ 1.25 wanted)")
    assert run.Bar("p50", "added p50", 1.2504, 1.25, True, "d").value_text() == "1.2504"
    # on the right side, or clearly off it: two decimals as always
    assert run.Bar("p50", "added p50", 1.2497, 1.25, True, "d").value_text() == "1.25"
    assert run.Bar("p50", "added p50", 1.31, 1.25, True, "d").value_text() == "1.31"
    assert run.Bar("hs", "handshake", 1.0004, 1.0, True, "d").value_text(nd=3) == "1.0004"
    assert run.Bar("p50", "added p50", None, 1.25, True, "d").value_text() == "—"
    # a cell of --over-runs for a run without the bar is empty, not another run's value
    assert run.Bar("p99_100", "p99", 0.91, 1.0, True, "d").text_for(None) == "—"


def tput16k(*mbs: float, reps: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    """MB/s per rep (the reps 0, 1, ... unless given)."""
    return [{"mb_per_s": mb, "rep": rep} for mb, rep in zip(mbs, reps or range(len(mbs)))]


def test_ratios_are_taken_rep_by_rep() -> None:
    # The host was fastest in rep 2 and slowest in rep 0, for both. gaia was ahead in two
    # reps of three; the ratio of the two medians (400 / 420) would say it was behind.
    results = {"gaia-uvloop": {"tput16k": tput16k(300, 400, 500)},
               "nginx": {"tput16k": tput16k(280, 420, 470)}}
    s = run.summarize(results)
    assert s["gaia-uvloop"]["mb16k/nginx"] == pytest.approx(500 / 470)  # of 1.071, 0.952, 1.064
    (line,) = [x for x in run.verdicts(s, results) if "throughput" in x]
    assert line.startswith("- throughput 16 KiB ≥ nginx's (64k buffers): **met** — 1.06 "), line
    assert "400 vs 420 MB/s" in line, line  # each target's median, for scale
    assert "| — / 1.06 |" in run.render(s, ["gaia-uvloop"])  # the table's ×direct / ×nginx


def test_a_rep_that_one_target_missed_is_left_out() -> None:
    # gaia failed its rep 0 step (not recorded): its reps 1 and 2 meet nginx's reps 1 and 2
    results = {"gaia-uvloop": {"tput16k": tput16k(400, 500, reps=(1, 2))},
               "nginx": {"tput16k": tput16k(100, 400, 400)}}
    assert run.summarize(results)["gaia-uvloop"]["mb16k/nginx"] == pytest.approx(1.125)
    # runs saved before results carried their rep pair by position
    for rows in results.values():
        for r in rows["tput16k"]:
            del r["rep"]
    assert run.summarize(results)["gaia-uvloop"]["mb16k/nginx"] == pytest.approx((4 + 1.25) / 2)
    assert run.paired_ratio(results, "gaia-uvloop", "direct", "mb16k") is None


def lat(p50s: dict[str, tuple[float, ...]], key: str) -> dict[str, dict[str, Any]]:
    """Latency records per target, one per rep: ``lat1`` passes or ``lat1x`` windows."""
    out: dict[str, dict[str, Any]] = {}
    direct = p50s["direct"]
    for name, values in p50s.items():
        out[name] = {key: [{"p50": v, "rep": i,
                            **({"added_p50": v - direct[i]} if key == "lat1x" else {})}
                           for i, v in enumerate(values)]}
    return out


def added_verdict(results: dict[str, Any]) -> str:
    (line,) = [x for x in run.verdicts(run.summarize(results), results) if "added p50" in x]
    return line


def test_the_added_p50_bar_is_judged_on_the_interleaved_windows_rep_by_rep() -> None:
    # One-target passes: gaia's median pass was slow (+70 against +50): 1.40, over the bar.
    # Interleaved windows: the host was slow in rep 2 for everyone, and gaia is 1.10-1.14x
    # nginx in every window.
    passes = lat({"direct": (50, 50, 50), "gaia-uvloop": (120, 100, 130),
                  "nginx": (100, 90, 110)}, "lat1")
    windows = lat({"direct": (50, 50, 80), "gaia-uvloop": (94, 94, 130),
                   "nginx": (90, 90, 124)}, "lat1x")
    assert added_verdict(passes).startswith(
        "- added p50 @1 conn ≤ 1.25× nginx's: **NOT met** — 1.40")
    for name in passes:
        passes[name].update(windows[name])
    line = added_verdict(passes)
    assert line.startswith(
        "- added p50 @1 conn ≤ 1.25× nginx's, interleaved round trips: **met** — 1.10 "), line
    assert "added 44.0 vs 40.0 µs" in line, line  # each target's median, for scale
    assert "passes of one target each: ×1.40, added 70.0 vs 50.0 µs" in line, line
    s = run.summarize(passes)
    assert s["gaia-uvloop"]["add50x/nginx"] == pytest.approx(1.1)  # of 1.1, 1.1, 1.136
    assert s["direct"]["add50x/nginx"] == 0.0  # direct adds nothing, by definition
    assert "| 44.0 (1.10) |" in run.render(s, ["gaia-uvloop"])


def test_an_interleaved_window_that_failed_leaves_the_others() -> None:
    results = lat({"direct": (50, 50, 50), "gaia-uvloop": (95, 96, 97),
                   "nginx": (90, 90, 90)}, "lat1x")
    for name in results:
        results[name]["lat1x"][1] = {"error": "target 2 closed the connection", "rep": 1}
    assert run.summarize(results)["gaia-uvloop"]["add50x/nginx"] == pytest.approx(
        (45 / 40 + 47 / 40) / 2)


def test_p99_pairs_are_taken_pass_by_pass_and_only_when_both_are_steal_free() -> None:
    gaia = lat100((600, 0.0), (900, 0.0), (640, 0.02), (500, 0.0))
    nginx = lat100((500, 0.0), (1000, 0.0), (640, 0.0), (9000, 0.03))
    results = {"gaia-uvloop": {"lat100": gaia}, "nginx": {"lat100": nginx}}
    # the third pair lost gaia's pass to steal, the fourth nginx's
    assert run.paired_p99(results, "gaia-uvloop", "nginx") == [1.2, 0.9]
    gaia.append({"error": "loadgen died"})
    assert run.paired_p99(results, "gaia-uvloop", "nginx") == []  # the pairs no longer line up
    nginx.append(lat100((700, 0.0))[0])
    assert run.paired_p99(results, "gaia-uvloop", "nginx") == [1.2, 0.9]
    assert run.spread([1.2, 0.8, 1.0, 1.4]) == (
        "×1.10 (quartiles 0.85-1.35, range 0.80-1.40; above 1 in 2 of 4)")
    assert run.spread([]) == "—"
    assert run.spread([0.6, 0.8, 1.0, 1.2, 1.4, 1.6]) == (  # 6: the fewest with an interval
        "×1.10 (95 % interval 0.60-1.60, quartiles 0.75-1.45, range 0.60-1.60; above 1 in 3 "
        "of 6)")


def test_the_a_a_control_reads_a_second_nginx_as_the_bars_read_gaia() -> None:
    results = {"gaia-uvloop": {"lat100": lat100((660, 0.0), (550, 0.0), (700, 0.0)),
                               "tput16k": tput16k(500, 450, 400)},
               "nginx": {"lat100": lat100((600, 0.0), (500, 0.0), (700, 0.0)),
                         "tput16k": tput16k(400, 450, 500)},
               "nginx-b": {"lat100": lat100((540, 0.0), (550, 0.0), (770, 0.0)),
                           "tput16k": tput16k(440, 450, 450)}}
    lines = run.aa_control(run.summarize(results), results)
    assert lines[1].startswith("A/A control: nginx-b, a second nginx"), lines
    assert "- throughput 16 KiB: ×1.00 | ×1.00" in lines, lines  # of 1.1, 1, 0.9 / 1.25, 1, 0.8
    assert ("- p99 @100 conns, steal-free passes: ×0.92 (550.0 vs 600.0 µs over 3 / 3 passes) "
            "| ×1.10") in lines, lines
    (pairs,) = [x for x in lines if "pass by pass" in x]
    assert pairs.endswith("×1.10 (quartiles 0.90-1.10, range 0.90-1.10; above 1 in 2 of 3) | "
                          "×1.10 (quartiles 1.00-1.10, range 1.00-1.10; above 1 in 2 of 3)"), pairs
    del results["nginx-b"]
    assert run.aa_control(run.summarize(results), results) == []
