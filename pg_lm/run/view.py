"""``pg-lm view RUN_DIR``: which tokens got the credit, as one self-contained HTML page.

    pg-lm view runs/lm                 # the last logged step -> runs/lm/view.html
    pg-lm view runs/lm --step 20 --output step20.html

Reads ``samples_tokens.jsonl`` (written by the trainer every ``--samples-every`` steps) and renders
one step's completions grouped by prompt, each with its reward, each token shaded by its advantage
on a diverging scale (blue > 0, red < 0, white 0; one scale for the page, shown in the legend).
Hovering a token shows its advantage, log-prob (and probability), KL to the reference and the
critic's value, where the run had them. The page has its CSS and a few lines of JavaScript inline
and loads nothing; every text from the run is HTML-escaped. The shading is in the HTML itself, so
the page reads the same with JavaScript off (the hover then falls back to the browser's tooltip).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from html import escape
from pathlib import Path

FILE = "samples_tokens.jsonl"  # written by pg_lm.lm.credit
POSITIVE, NEGATIVE, WHITE = (33, 102, 172), (178, 24, 43), (255, 255, 255)
OBSERVATION = "#f4f4f4"  # an episode's observation and template tokens: grey, no advantage
LABELS = {"advantage": "advantage", "logp": "log-prob", "kl": "KL to ref", "value": "value"}


def shade(x: float | None, scale: float) -> str:
    """The background of a token whose advantage is ``x`` on a page whose largest |advantage| is
    ``scale``: white at 0, full blue at +scale, full red at -scale, linear between (grey if None).

    >>> shade(0.0, 1.0), shade(1.0, 1.0), shade(-2.0, 1.0), shade(0.5, 1.0)
    ('#ffffff', '#2166ac', '#b2182b', '#90b3d6')
    """
    if x is None:
        return "#dddddd"
    t = max(-1.0, min(1.0, x / scale)) if scale > 0 else 0.0
    end = POSITIVE if t >= 0 else NEGATIVE
    rgb = [math.floor(w + abs(t) * (e - w) + 0.5) for w, e in zip(WHITE, end)]  # halves up
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _prompt_text(prompt) -> str:
    """A prompt as text: a chat prompt (a list of messages) one ``role: content`` line each."""
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in prompt)
    return str(prompt)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _token(row: dict, k: int, scale: float) -> str:
    """One token as a shaded ``<span>``: its numbers in ``data-*`` attributes and the tooltip. In an
    episode of many turns (``row["action"]``), a token the policy did not sample (an observation or
    the template's) is greyed and unshaded: it has no advantage."""
    if "action" in row and not row["action"][k]:
        text = row["tokens"][k].replace("\n", "\u21b5\n")
        return f'<span class="t obs" style="background:{OBSERVATION}" title="observation">{escape(text)}</span>'
    adv = row["advantage"][k]
    bg = shade(adv, scale)
    dark = adv is not None and scale > 0 and abs(adv) / scale > 0.6
    info = []
    for q in (q for q in LABELS if q in row):
        x = row[q][k]
        info.append(f"{LABELS[q]} {_fmt(x)}" + (f" (p {math.exp(x):.3f})" if q == "logp" and x is not None else ""))
    data = "".join(f' data-{q}="{_fmt(row[q][k])}"' for q in LABELS if q in row)
    text = row["tokens"][k].replace("\n", "\u21b5\n")  # a newline token stays visible
    cls = "t dark" if dark else "t"
    return (f'<span class="{cls}" style="background:{bg}"{data} title="{escape(" | ".join(info))}">'
            f"{escape(text)}</span>")


def _legend(scale: float, quantities: list[str]) -> str:
    stops = ", ".join(shade(scale * t / 4, scale) for t in range(-4, 5))
    hover = ", ".join(LABELS[q] for q in quantities)
    return (f'<div class="legend"><span>{-scale:.3g}</span><span class="bar" style="background:linear-gradient('
            f'to right, {stops})"></span><span>+{scale:.3g}</span> <span class="note">token background = its '
            f"advantage (one scale for the page: the largest |advantage|); hover a token for {escape(hover)}</span></div>")


def render(rows: list[dict], title: str = "pg_lm credit view", note: str = "") -> str:
    """The HTML page of ``rows`` (``samples_tokens.jsonl`` rows of one step): completions grouped by
    their ``group`` (the G samples of one prompt) in order of appearance, each with its reward and
    its tokens shaded by advantage; ``note`` is added to the line under the title."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row.get("step"), row.get("group"), json.dumps(row["prompt"])), []).append(row)
    advs = [abs(a) for r in rows for a in r["advantage"] if a is not None]
    scale = max(advs, default=0.0)
    quantities = [q for q in LABELS if any(q in r for r in rows)]
    rewards = [r["reward"] for r in rows]
    parts = [f"<h1>{escape(title)}</h1>",
             f'<p class="meta">{len(rows)} completions of {len(groups)} prompts; mean reward '
             f"{sum(rewards) / max(len(rewards), 1):.4g}{escape(note)}</p>", _legend(scale, quantities)]
    for (_, _, _), members in groups.items():
        mean = sum(r["reward"] for r in members) / len(members)
        parts.append(f'<section class="group"><div class="prompt">{escape(_prompt_text(members[0]["prompt"]))}</div>'
                     f'<div class="gmeta">{len(members)} samples, mean reward {mean:.4g}</div>')
        for r in members:
            toks = "".join(_token(r, k, scale) for k in range(len(r["tokens"])))
            parts.append(f'<div class="completion"><span class="reward">reward {r["reward"]:.4g}</span>'
                         f'<span class="tokens">{toks}</span></div>')
        parts.append("</section>")
    return PAGE.format(title=escape(title), body="\n".join(parts))


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.5 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.3em; margin: 0 0 .3em; }}
.meta, .gmeta, .note {{ color: #666; font-size: .9em; }}
.legend {{ display: flex; align-items: center; gap: .5em; margin: .5em 0 1em; }}
.bar {{ display: inline-block; width: 240px; height: 14px; border: 1px solid #999; }}
.group {{ border: 1px solid #ccc; border-radius: 6px; padding: .6em .8em; margin: 0 0 1em; }}
.prompt {{ white-space: pre-wrap; font-weight: 600; margin-bottom: .2em; }}
.completion {{ display: flex; gap: .8em; padding: .25em 0; border-top: 1px dashed #ddd; }}
.reward {{ flex: 0 0 7.5em; font-variant-numeric: tabular-nums; color: #444; }}
.tokens {{ font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-all; }}
.t {{ border-right: 1px solid rgba(0, 0, 0, .12); cursor: default; }}
.t.dark {{ color: #fff; }}
.t.obs {{ color: #999; }}
.t:hover {{ outline: 2px solid #000; }}
#info {{ position: fixed; right: 1em; bottom: 1em; background: #fff; border: 1px solid #888; border-radius: 4px;
        padding: .4em .6em; font: 13px ui-monospace, monospace; display: none; white-space: pre; }}
</style></head>
<body>
{body}
<div id="info"></div>
<script>
// the hovered token's numbers in a panel (its title attribute is the fallback without JavaScript)
const info = document.getElementById("info");
document.addEventListener("mouseover", e => {{
  const t = e.target.closest(".t");
  if (!t) {{ info.style.display = "none"; return; }}
  info.textContent = t.title.split(" | ").join("\\n");
  info.style.display = "block";
}});
</script>
</body></html>
"""


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``samples_tokens.jsonl``; a line cut short by a kill is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def build(run_dir: str, step: int | None = None, output: str | None = None) -> Path:
    """Write the page of ``step`` (default: the last logged) of the run in ``run_dir``; returns its path.
    A ``ValueError`` naming the folder, file or step when there is nothing to show."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"{run_dir}: no such run folder")
    path = run / FILE
    if not path.exists():
        raise ValueError(f"{path}: no such file (the run recorded no per-token samples: it predates them, or "
                         "stopped before its first logged step)")
    rows = read_rows(path)
    steps = sorted({r["step"] for r in rows})
    if not steps:
        raise ValueError(f"{path}: holds no samples")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"--step {step}: not logged in {path} (logged steps: {', '.join(map(str, steps))})")
    out = Path(output) if output else run / "view.html"
    html = render([r for r in rows if r["step"] == step], title=f"pg_lm credit view: {run.resolve().name}, step {step}",
                  note=f"; logged steps: {', '.join(map(str, steps))} (pg-lm view RUN_DIR --step N)")
    out.write_text(html, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pg-lm view", description="Render a run's logged completions, each token "
                                "shaded by its advantage, as one self-contained HTML page.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a language-model run's --output-dir")
    p.add_argument("--step", type=int, default=None, help="the logged step to show (default: the last)")
    p.add_argument("--output", default=None, help="the page to write (default: RUN_DIR/view.html)")
    args = p.parse_args(argv)
    try:
        out = build(args.run_dir, args.step, args.output)
    except (ValueError, OSError) as e:  # OSError: --output not writable
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
