"""``pg-lm view``: the per-token record the trainer writes (samples_tokens.jsonl) and the HTML page
built from it, down to a page rendered by headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from lm_fixtures import SPECIALS, make_trainer, read_jsonl

from pg_lm.cli import main
from pg_lm.lm.credit import token_rows, token_texts
from pg_lm.run import trim_logs
from pg_lm.run.view import render, shade


class Spans(HTMLParser):
    """The token spans of a page: (text, background, data-* attributes, title), in order."""

    def __init__(self):
        super().__init__()
        self.spans, self._open = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and "t" in a.get("class", "").split():
            bg = re.search(r"background:\s*(#[0-9a-f]{6}|rgb\([^)]*\))", a["style"]).group(1)
            self._open = {"text": "", "bg": bg, "title": a.get("title"),
                          "data": {k[5:]: v for k, v in a.items() if k.startswith("data-")}}

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            self._open = None


def spans(html: str) -> list[dict]:
    p = Spans()
    p.feed(html)
    return p.spans


def row(group, reward, tokens, adv, prompt="p", **more):
    return {"step": 3, "group": group, "prompt": prompt, "completion": "".join(tokens), "reward": reward,
            "tokens": tokens, "advantage": adv, "logp": [-0.5] * len(tokens), **more}


# ---------------------------------------------------------------- the HTML builder

def test_shade_is_a_diverging_scale_white_at_zero_clipped_at_the_page_scale():
    assert shade(0.0, 2.0) == "#ffffff"
    assert shade(2.0, 2.0) == shade(5.0, 2.0) == "#2166ac"  # full blue at +scale, clipped beyond
    assert shade(-2.0, 2.0) == shade(-9.0, 2.0) == "#b2182b"  # full red at -scale
    assert shade(1.0, 2.0) == "#90b3d6"  # halfway: (255 + (33 - 255) / 2, ...) rounded
    assert shade(None, 1.0) == "#dddddd" and shade(0.3, 0.0) == "#ffffff"  # missing / an all-zero page


def test_page_escapes_every_text_from_the_run():
    evil = ["<script>", "alert(1)", "</script>", " & ", '"q"']
    html = render([row(0, 1.0, evil, [1.0, -1.0, 0.5, 0.0, 0.25], prompt="<b>bold</b> & co", kl=[0.1] * 5)])
    assert "<script>alert" not in html and "<b>bold" not in html
    assert "&lt;script&gt;" in html and "&lt;b&gt;bold&lt;/b&gt; &amp; co" in html and " &amp; " in html
    assert html.count("<script>") == 1  # the page's own, and nothing else opens one
    assert not re.search(r"https?:|src=|href=|@import", html)  # self-contained: loads nothing
    got = spans(html)
    assert [s["text"] for s in got] == evil  # the parser un-escapes back to the tokens as they were
    assert got[0]["title"].startswith("advantage 1 | log-prob -0.5 (p 0.607) | KL to ref 0.1")


def test_tokens_are_shaded_by_advantage_on_one_scale_for_the_page():
    rows = [row(0, 1.0, ["a", "b"], [0.5, -0.25]), row(0, 0.0, ["c"], [-1.0]), row(1, 0.5, ["d"], [None])]
    got = spans(render(rows))
    assert [s["bg"] for s in got] == [shade(0.5, 1.0), shade(-0.25, 1.0), shade(-1.0, 1.0), "#dddddd"]
    assert [s["data"]["advantage"] for s in got] == ["0.5", "-0.25", "-1", "n/a"]
    assert "value" not in got[0]["data"] and "kl" not in got[0]["data"]  # shown only when the run has them


def test_completions_are_grouped_by_prompt_with_their_rewards():
    rows = [row(0, 1.0, ["x"], [1.0], prompt="first"), row(0, 0.0, ["y"], [-1.0], prompt="first"),
            row(1, 0.25, ["z"], [0.0], prompt=[{"role": "user", "content": "second"}])]
    html = render(rows)
    sections = re.findall(r'<section class="group">(.*?)</section>', html, re.S)
    assert len(sections) == 2
    assert '<div class="prompt">first</div>' in sections[0] and "2 samples, mean reward 0.5" in sections[0]
    assert re.findall(r"reward (\S+)</span>", sections[0]) == ["1", "0"]
    assert "user: second" in sections[1] and [s["text"] for s in spans(sections[1])] == ["z"]


def test_token_texts_are_the_pieces_of_the_decoded_text_an_unfinished_character_on_its_last_byte():
    class Bytes:  # a byte-level tokenizer: each id one UTF-8 byte
        def decode(self, ids, **_):
            return bytes(ids).decode("utf-8", errors="replace")

    ids = list("a é&".encode())
    assert token_texts(Bytes(), ids) == ["a", " ", "", "é", "&"]
    assert token_texts(Bytes(), ids, context=0) == ["a", " ", "", "é", "&"]
    ids = list("€€ x".encode())  # 3-byte characters; the context window starts mid-character
    assert token_texts(Bytes(), ids, context=1) == ["", "", "€", "", "", "€", " ", "x"]


# ---------------------------------------------------------------- what the trainer records

def test_trainer_records_every_token_of_the_logged_samples(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, max_steps=3, samples_every=2, estimator="gae", lora_r=0, kl_coef=0.1)
    tr.train()
    rows = read_jsonl(tmp_path / "samples_tokens.jsonl")
    plain = read_jsonl(tmp_path / "samples.jsonl")
    assert sorted({r["step"] for r in rows}) == [1, 2]  # the steps samples.jsonl logs, no others
    assert [(r["prompt"], r["completion"], r["reward"]) for r in rows] == [
        (r["prompt"], r["completion"], r["reward"]) for r in plain]
    G = 4
    for i, r in enumerate(rows):
        n = len(r["tokens"])
        assert r["group"] == (i % (len(rows) // 2)) // G
        assert all(len(r[q]) == n for q in ("advantage", "logp", "kl", "value"))
        assert "".join(t for t in r["tokens"] if t not in SPECIALS) == r["completion"]  # special tokens kept
        assert all(x <= 0 for x in r["logp"])


def test_token_rows_match_the_batch(tiny_lm_dir, tmp_path):
    """The numbers recorded are the trained advantages and the rollout's log-probs, per real token."""
    tr = make_trainer(tiny_lm_dir, tmp_path)
    batch, _ = tr.rollout()
    adv, _ = tr.advantages(batch)
    rows = token_rows(batch, adv, tr.tok, 1, 4)
    assert "kl" not in rows[0] and "value" not in rows[0]  # no reference, no critic
    for i, r in enumerate(rows):
        n = int(batch.completion_mask[i].sum())
        assert len(r["tokens"]) == n
        assert torch.allclose(torch.tensor(r["advantage"]), adv[i, :n].float(), atol=1e-4)
        assert torch.allclose(torch.tensor(r["logp"]), batch.sampler_logp[i, :n].float(), atol=1e-4)


def test_resume_trims_the_token_record_with_the_other_logs(tmp_path):
    (tmp_path / "samples_tokens.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"st')
    trim_logs(tmp_path, 2)
    assert [r["step"] for r in read_jsonl(tmp_path / "samples_tokens.jsonl")] == [1, 2]


# ---------------------------------------------------------------- the command

def test_view_without_the_record_is_one_line_naming_the_file_exit_2(tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'samples_tokens.jsonl'}: no such file")
    assert main(["view", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "samples_tokens.jsonl").write_text(json.dumps(row(0, 1.0, ["a"], [1.0])) + "\n")
    assert main(["view", str(tmp_path), "--step", "7"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --step 7: not logged in {tmp_path / 'samples_tokens.jsonl'} "
                                               "(logged steps: 3)")


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_view_of_a_real_run_renders_in_headless_chromium(tiny_lm_dir, tmp_path, capsys):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium); the page is not rendered")
    run = tmp_path / "run"
    rewards = tmp_path / "rewards.py"  # rewards that differ within a group: some tokens get credit
    rewards.write_text("def varied(prompts, completions, **_):\n"
                       "    return [float(sum(map(ord, c)) % 7) / 7.0 for c in completions]\n")
    code = main(["lm", "--model", tiny_lm_dir, "--output-dir", str(run), "--reward", f"{rewards}:varied",
                 "--max-steps", "2", "--samples-every", "2", "--prompts-per-step", "2", "--samples-per-prompt", "3", "--max-new-tokens", "8", "--progress", "false",
                 "--save-model", "false", "--lora-r", "0", "--eval-every", "0", "--eval-size", "2"])
    assert code == 0
    capsys.readouterr()
    assert main(["view", str(run)]) == 0
    page = run / "view.html"
    assert capsys.readouterr().out.strip() == str(page)
    rows = [r for r in read_jsonl(run / "samples_tokens.jsonl") if r["step"] == 2]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    got = spans(dom)
    assert [s["text"] for s in got] == [t.replace("\n", "\u21b5\n") for r in rows for t in r["tokens"]]
    scale = max(abs(a) for r in rows for a in r["advantage"])
    assert scale > 0
    want = [shade(a, scale) for r in rows for a in r["advantage"]]
    assert [s["bg"] for s in got] == want
    # hovering a token shows its numbers in the panel (the page's script, run by the browser)
    k = max(range(len(got)), key=lambda i: abs(float(got[i]["data"]["advantage"])))
    hover = tmp_path / "hover.html"
    hover.write_text(page.read_text().replace("</body>", '<script>document.querySelectorAll(".t")[%d].dispatchEvent('
                                              'new MouseEvent("mouseover", {bubbles: true}));</script></body>' % k))
    dom = subprocess.run([browser, *flags, "--dump-dom", hover.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    panel = re.search(r'<div id="info" style="display: block;">(.*?)</div>', dom, re.S)
    assert panel is not None and panel.group(1).split("\n") == got[k]["title"].split(" | ")
    assert panel.group(1).startswith(f"advantage {got[k]['data']['advantage']}\nlog-prob ")
    # and painted: every token's colour is on the screenshot (each a background of some 100 pixels)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, "--hide-scrollbars", "--window-size=1000,2000", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    counts = dict((rgb, n) for n, rgb in Image.open(shot).convert("RGB").getcolors(1 << 24))
    for colour in set(want) - {"#ffffff"}:
        assert counts.get(tuple(int(colour[k:k + 2], 16) for k in (1, 3, 5)), 0) >= 10, f"{colour} is not on the page"


def test_an_episodes_observation_tokens_are_greyed_and_unshaded():
    """With the action flags an episode's rows carry, tokens the policy did not sample are drawn apart."""
    rows = [row(0, 1.0, ["a", "\n", "o", "b"], [0.5, 0.0, 0.0, -0.25], action=[1, 0, 0, 1])]
    got = spans(render(rows))
    assert [s["bg"] for s in got] == [shade(0.5, 0.5), "#f4f4f4", "#f4f4f4", shade(-0.25, 0.5)]
    assert [s["title"] for s in got][1:3] == ["observation", "observation"] and got[0]["data"]["advantage"] == "0.5"
    assert 'class="t obs"' in render(rows)
