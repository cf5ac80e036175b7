"""The HTML report: every section present, plots embedded, data escaped, renders in Chromium.

The Chromium check runs Debian's `chromium` headless on the written file and (1) takes a
screenshot, kept as artifacts/report-screenshot.png for a person to look at, and checks it is a
real picture with the plots' colours in it; (2) reads Chromium's log on stderr, where every
page console message appears as an ``INFO:CONSOLE`` line. The report has no JavaScript, so any
console message at all (an uncaught error, a resource that failed to load) is a failure.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cai.audit import load_audit, summarize
from cai.constitution import load_constitution
from cai.gate import CategoryFigure, JudgeCheck
from cai.records import MetricRow
from cai.report import SECTIONS, write_report
from cai.report.plots import series

FIXTURE = Path(__file__).parent / "fixtures" / "audit_rows.jsonl"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CONSOLE_ERROR = re.compile(r"CONSOLE|Uncaught|Failed to load resource")
PLOT_BLUE = (0x24, 0x56, 0xA6)  # the report's main bar colour
PLOT_ORANGE = (0xD9, 0x82, 0x2B)  # contested / disagreement colour
BANNER_RED = (0xB3, 0x26, 0x1E)  # the no-signal banner's border


def fake_gate(agreement: float = 0.72, consistency: float = 0.81) -> JudgeCheck:
    return JudgeCheck(
        gold="gold_harmless.jsonl",
        gold_hash="g" * 64,
        judge_model="fixture/judge",
        n=64,
        agreement=agreement,
        ci=(agreement - 0.11, agreement + 0.1),
        coverage=0.9,
        agreement_given_verdict=0.8,
        by_category={
            name: CategoryFigure(n=16, agreement=value)
            for name, value in (("harm", 0.94), ("harm-subtle", 0.69), ("evasive", 0.5), ("helpful", 0.75))
        },
        position_consistency=consistency,
        no_verdict={"position-inconsistent": 30},
        comparisons=256,
        seconds=41.0,
        scored_tokens=90000,
        generated_tokens=0,
    )


def fake_ppo_history() -> list[dict]:
    return [
        {
            "step": s,
            "reward_mean": -0.4 + 0.08 * s,
            "reward_std": 0.3,
            "kl": 0.01 * s**1.4,
            "kl_coef": 0.1 - 0.002 * s,
            "policy_loss": 0.05,
        }
        for s in range(25)
    ]


def fake_eval_rows() -> list[MetricRow]:
    rows = [
        MetricRow(metric="harmless_rate", policy=p, value=v, ci_low=v - 0.08, ci_high=v + 0.07, n=60)
        for p, v in (("base", 0.41), ("sft", 0.63), ("ppo", 0.79))
    ]
    rows += [
        MetricRow(metric="helpful_win_rate_vs_base", policy=p, value=v, ci_low=v - 0.1, ci_high=v + 0.1, n=40)
        for p, v in (("sft", 0.55), ("ppo", 0.51))
    ]
    rows.append(MetricRow(metric="elo", policy="ppo", value=1040.0, n=120, note="no interval"))
    rows.append(MetricRow(metric="pm_accuracy", policy="pm", value=0.72, ci_low=0.63, ci_high=0.8, n=100))
    return rows


FAKE_VERIFY = {
    "mode": "filter",
    "accepted": 3,
    "rejected": 2,
    "better": 3,
    "worse": 1,
    "no_verdict": 1,
    "by_principle": {
        "harmful": {"accepted": 3, "rejected": 1, "better": 3, "worse": 1, "no_verdict": 0},
        "<i>odd</i>": {"accepted": 0, "rejected": 1, "better": 0, "worse": 0, "no_verdict": 1},
    },
}
"""An SL stage's summary["verify"] (`cai.verify.verify_summary`) under sl.verify: filter."""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return write_report(
        tmp_path_factory.mktemp("report") / "nested" / "report.html",
        audit=summarize(load_audit(FIXTURE), fake_gate()),
        ppo_history=fake_ppo_history(),
        eval_rows=fake_eval_rows(),
        pm_metrics={"accuracy": 0.72, "eval_loss": 0.57, "pairs": 100},
        sl_verify=FAKE_VERIFY,
        summary={
            "sl": {
                "elapsed_s": 12.5,
                "rows": 40,
                "usage": {"prompt_tokens": 12000, "completion_tokens": 3100},
            },
            "label": {
                "elapsed_s": 31.0,
                "rows": 8,
                "usage": {"prompt_tokens": 51000, "completion_tokens": 16},
            },
        },
        title="Fixture run <b>&</b>",
        constitution=load_constitution("harmless"),
    )


def test_sections_plots_and_escaping(report):
    page = report.read_text(encoding="utf-8")
    for name in SECTIONS.values():
        assert f"<h2>{name}</h2>" in page
    assert "not run" not in page  # every section had data
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pngs) == 5  # influence, soft labels, position consistency, PPO, eval
    assert all(base64.b64decode(p).startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    # Data is escaped: the fixture's response holds a script tag, its prompt bold markup.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower()
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &#x27;quotes&#x27;" in page
    assert "<title>Fixture run &lt;b&gt;&amp;&lt;/b&gt;</title>" in page
    # Self-contained: no reference leaves the file.
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"https?:|//[a-z]", without_images)
    refs = re.findall(r'(?:src|href)="([^"]*)"', without_images)
    assert sorted(refs) == sorted([""] * 5 + [f"#{key}" for key in SECTIONS])  # 5 images, the nav


def test_content_reads_right(report):
    page = report.read_text(encoding="utf-8")
    # verified revisions: one row per principle (escaped), then the totals
    assert "<td>harmful</td>" + "".join(f'<td class="num">{n}</td>' for n in (3, 1, 3, 1, 0)) in page
    assert "<td>&lt;i&gt;odd&lt;/i&gt;</td>" in page
    assert "<td>all</td>" + "".join(f'<td class="num">{n}</td>' for n in (3, 2, 3, 1, 1)) in page
    assert "kept only revisions judged better" in page
    assert "88.2% (30/34 comparisons)" in page  # judge quality, worked out in test_audit.py
    assert "<td>label-006</td><td>0 &gt; 1</td><td>0.300</td>" in page  # contested table
    assert "harm, safety" in page  # tags from the constitution
    assert "0.630 – 0.800" in page  # PM accuracy interval
    assert page.count('<div class="label">') == 10
    # gold agreement with its interval, in the gate section and in the judge table
    assert "agreement <b>0.72</b>, 95% bootstrap interval 0.61 – 0.82" in page
    assert "<td>gold agreement (95% CI)</td><td>0.72 [0.61, 0.82] on 64 pairs</td>" in page
    assert "<td>evasive</td>" in page and "Gate passed." in page
    assert 'class="banner"' not in page  # the gate passed and 9 of 10 labels have verdicts
    # contested principles: illegal and privacy gave opposite verdicts on 2 of their 3 shared pairs
    assert page.count('<table class="heatmap"') == 1  # principles only: no vote names a group
    assert (
        '<td>illegal</td><td>privacy</td><td>66.7%</td><td class="num">2</td><td class="num">3</td>' in page
    )
    assert (
        'title="illegal × privacy: 2 of 3 shared verdicts disagreed">66.7%<br><span class="n">n=3</span>'
        in page
    )


def test_missing_sections_say_not_run(tmp_path):
    page = write_report(
        tmp_path / "r.html",
        audit=None,
        ppo_history=None,
        eval_rows=None,
        pm_metrics=None,
        summary=None,
        title="empty",
    ).read_text()
    for name in SECTIONS.values():
        assert f"<h2>{name}</h2>" in page
    assert page.count('class="not-run"') == len(SECTIONS)
    assert "data:image/png" not in page


def test_max_labels_and_trainer_history_keys(tmp_path):
    rows = load_audit(FIXTURE)
    trainer_history = [
        {"step": s, "reward": 0.1 * s, "kl": 0.02 * s} for s in range(1, 4)
    ]  # cai.train.ppo's keys
    page = write_report(
        tmp_path / "r.html",
        audit=summarize(rows),
        ppo_history=trainer_history,
        eval_rows=None,
        pm_metrics=None,
        summary=None,
        title="t",
        max_labels=3,
    ).read_text()
    assert page.count('<div class="label">') == 3 and "showing 3 of 10 labels" in page
    assert page.count('class="not-run"') == 5  # summary, verify, judge gate (not measured), eval, PM
    assert page.count("data:image/png;base64,") == 4  # the audit's three plots and PPO
    assert series(trainer_history, "reward") == ([1.0, 2.0, 3.0], [0.1, 0.2, pytest.approx(0.3)])


def noise_report(path: Path) -> Path:
    """A run whose judge failed its gate and whose labels mostly carry no verdict."""
    rows = load_audit(FIXTURE)
    silent = [rows[8].model_copy(update={"label_id": f"label-s{n}"}) for n in range(4)]  # like 009
    return write_report(
        path,
        audit=summarize(
            silent + rows[:2],
            fake_gate(agreement=0.31, consistency=0.0),
            ["gold agreement 0.31 is below label.gate.min_agreement=0.6"],
        ),
        ppo_history=None,
        eval_rows=None,
        pm_metrics=None,
        summary=None,
        title="noise",
    )


def test_banner_when_the_gate_failed_or_labels_have_no_verdict(tmp_path):
    page = noise_report(tmp_path / "noise.html").read_text()
    banner = page.index('class="banner"')
    assert banner < page.index("<nav>")  # the reader sees it before anything else
    assert "These labels carry no measurable signal" in page
    assert "4 of 6 labels had no verdict" in page
    assert "the judge failed its gate: gold agreement 0.31" in page and "Gate failed." in page


# ------------------------------------------------------------------------- headless Chromium


def render(page: Path, out: Path) -> tuple[Path, list[str]]:
    """Screenshot `page` with headless Chromium; return the PNG and any console-error lines."""
    shot = out / "shot.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={out / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        "--window-size=1280,4000",
        page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if CONSOLE_ERROR.search(line)]
    return shot, errors


def near(pixels, colour: tuple[int, int, int], tolerance: int = 12) -> int:
    import numpy as np

    diff = np.abs(pixels[..., :3].astype(np.int16) - np.array(colour, dtype=np.int16))  # (H, W, 3)
    return int((diff.max(axis=-1) <= tolerance).sum())


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)
def test_renders_in_headless_chromium(report, tmp_path):
    import numpy as np
    from matplotlib.image import imread

    shot, errors = render(report, tmp_path)
    assert errors == [], "console errors while rendering the report:\n" + "\n".join(errors)
    assert shot.stat().st_size > 50_000
    pixels = (imread(shot)[..., :3] * 255).round().astype(np.uint8)  # (H, W, 3)
    assert pixels.shape[:2] == (4000, 1280)
    packed = pixels.reshape(-1, 3).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.uint32)
    assert len(np.unique(packed)) > 500  # text, tables and plots, not a blank page
    # The plots are drawn: thousands of pixels in the bar colours (CSS uses neither).
    assert near(pixels, PLOT_BLUE) > 20_000
    assert near(pixels, PLOT_ORANGE) > 5_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report-screenshot.png")


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)
def test_banner_renders_at_the_top_in_headless_chromium(tmp_path):
    import numpy as np
    from matplotlib.image import imread

    shot, errors = render(noise_report(tmp_path / "noise.html"), tmp_path)
    assert errors == []
    pixels = (imread(shot)[..., :3] * 255).round().astype(np.uint8)  # (H, W, 3)
    assert near(pixels[:500], BANNER_RED, tolerance=8) > 1_500  # its red border, above the fold
    calm_dir = tmp_path / "calm"
    calm_dir.mkdir()
    page = write_report(
        calm_dir / "calm.html",
        audit=summarize(load_audit(FIXTURE)[:2], fake_gate()),
        ppo_history=None,
        eval_rows=None,
        pm_metrics=None,
        summary=None,
        title="calm",
    )
    calm, _ = render(page, calm_dir)
    calm_pixels = (imread(calm)[..., :3] * 255).round().astype(np.uint8)
    assert near(calm_pixels[:500], BANNER_RED, tolerance=8) < 200  # no banner, no red block


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)
def test_heatmap_renders_in_headless_chromium(report, tmp_path):
    """Chromium parses the heatmap into a 5 x 5 grid: its DOM has every cell, n included."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", report.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    dom = result.stdout
    grid = dom[dom.index('<table class="heatmap"') :]
    grid = grid[: grid.index("</table>")]
    assert grid.count("<tr>") == 6  # the header row and one row per principle
    assert grid.count('<td class="hm') == 25
    assert grid.count('<td class="hm self"></td>') == 5
    assert grid.count(">n=3<") == 4  # illegal x privacy and violence x privacy, both ways
    assert grid.count('<td class="hm"></td>') == 8  # misinformation never gave a verdict: n = 0
    assert '<th class="unit">2 · illegal</th>' in grid
    assert "misinformation shared no verdict with any other principle" in dom


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)
def test_console_error_check_catches_errors(tmp_path):
    """The check above must be able to fail: a page with a script error and a missing image."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img src="missing.png"><script>nope();</script></body></html>'
    )
    _, errors = render(page, tmp_path)
    assert any("Uncaught ReferenceError" in line for line in errors), errors
