"""The pairwise judge: both orders cancel position bias, length control removes a taste for length and keeps one for
content, calibration says when a judge is no better than chance, and each backend reads real label probabilities."""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest

from fine_tune_llm.errors import ConfigError, EnvironmentNotReady
from fine_tune_llm.eval import judge as J
from fine_tune_llm.eval.judge_backends import OpenAIJudge, load_judge, read_label_logprobs
from tests.conftest import SMOLLM_DIR, SMOLLM_GGUF, need

ANSWER = re.compile(r"\[Answer (A|B)\]\n(.*?)\n\[End of answer \1\]", re.DOTALL)


class ScoringJudge:
    """A fake judge: p("A") = sigmoid(score(answer A) - score(answer B) + tilt)."""

    def __init__(self, score, tilt: float = 0.0):
        self.score, self.tilt, self.calls = score, tilt, 0

    def label_logprobs(self, messages, labels):
        self.calls += 1
        found = dict(ANSWER.findall(messages[-1]["content"]))
        logit = self.score(found["A"]) - self.score(found["B"]) + self.tilt
        p_a = 1 / (1 + math.exp(-logit))
        by_label = {"A": math.log(p_a), "B": math.log(1 - p_a)}
        return [by_label[label] for label in labels]

    def describe(self):
        return {"backend": "fake"}


class RandomJudge:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def label_logprobs(self, messages, labels):
        return [float(v) for v in self.rng.normal(size=len(labels))]

    def describe(self):
        return {"backend": "random"}


def content_equal_columns(n: int = 60):
    """Tuned answers = the base answer plus 0..39 filler words: longer, saying nothing more."""
    questions = [f"question {i}?" for i in range(n)]
    base = [f"Base answer number {i}." for i in range(n)]
    tuned = [b + " and so on" * (i % 14) for i, b in enumerate(base)]
    return questions, tuned, base


def test_a_judge_that_always_prefers_position_a_gives_a_fifty_percent_win_rate_and_reports_its_bias():
    questions, tuned, base = content_equal_columns(20)
    judge = ScoringJudge(lambda text: 0.0, tilt=math.log(4))  # p("A") = 0.8 whatever the answers
    out = J.win_rate(judge, questions, tuned, base, progress=False)
    assert judge.calls == 2 * 20  # every pair asked in both orders
    assert out["win_rate"] == pytest.approx(0.5)
    assert out["win_rate_ci95"] == pytest.approx([0.5, 0.5])
    assert out["position_bias"] == pytest.approx(0.3)
    assert out["order_consistent"] == 0.0  # the winner flips with the order on every pair
    assert out["ties"] == 20 and out["wins"] == out["losses"] == 0
    item = out["items"][0]
    assert (item["p_x_as_a"], item["p_x_as_b"]) == pytest.approx((0.8, 0.2))
    calibrated = J.calibrate(judge, questions, tuned, base, progress=False)
    assert calibrated["agreement"] == 0.5 and not calibrated["trusted"]
    assert "same winner in both orders on only 0% of pairs" in calibrated["verdict"]


def test_length_control_removes_a_taste_for_length_and_keeps_one_for_content():
    questions, tuned, base = content_equal_columns()
    by_length = J.win_rate(ScoringJudge(lambda t: 0.15 * J.words(t)), questions, tuned, base, progress=False)
    assert by_length["win_rate"] > 0.75  # the longer column wins raw...
    assert by_length["win_rate_ci95"][0] > 0.7
    assert by_length["lc_win_rate"] == pytest.approx(0.5, abs=0.03)  # ...and not once length is held equal
    lo, hi = by_length["lc_win_rate_ci95"]
    assert lo - 0.01 <= 0.5 <= hi + 0.01 and hi - lo < 0.2
    assert by_length["length_slope"] > 1

    kind = [t.replace("Base answer", "I hear you. Answer") for t in tuned]
    content = ScoringJudge(lambda t: 2.0 * ("I hear you" in t) + 0.15 * J.words(t))
    by_content = J.win_rate(content, questions, kind, base, progress=False)
    assert by_content["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-2.0)), abs=0.05)  # the content effect
    assert by_content["lc_win_rate_ci95"][0] > 0.75


def test_the_logistic_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-(0.7 - 1.3 * x)))).astype(float)
    b0, b1 = J.fit_logistic(x, y, ridge=0.0)
    assert (b0, b1) == pytest.approx((0.7, -1.3), abs=0.1)


def test_calibration_reads_a_random_judge_as_no_better_than_chance():
    questions = [f"q{i}" for i in range(100)]
    chosen = [f"A kind answer {i} with some more words" for i in range(100)]
    rejected = [f"Curt answer {i}" for i in range(100)]
    out = J.calibrate(RandomJudge(seed=3), questions, chosen, rejected, progress=False)
    lo, hi = out["agreement_ci95"]
    assert lo <= 0.5 <= hi
    assert out["trusted"] is False
    assert "no better than chance" in out["verdict"]
    assert out["pairs"] == 100 and out["chosen_longer"] == 1.0
    assert out["near_equal_length"] == {"pairs": 0}


def test_calibration_tells_a_length_judge_from_a_content_judge():
    questions = [f"q{i}" for i in range(40)]
    chosen = [f"I hear you, that sounds hard {i}. Let us look at it together." for i in range(40)]
    rejected = [f"Stop complaining {i}." for i in range(40)]
    by_length = J.calibrate(ScoringJudge(lambda t: 0.3 * J.words(t)), questions, chosen, rejected, progress=False)
    assert by_length["agreement"] == 1.0
    assert by_length["length_matched"]["agreement"] == 0.5  # equal lengths: every pair a tie
    assert "only while the chosen answer is longer" in by_length["verdict"] and not by_length["trusted"]

    by_content = J.calibrate(ScoringJudge(lambda t: 3.0 * t.startswith("I hear")), questions, chosen, rejected,
                             progress=False)
    assert by_content["length_matched"]["agreement"] == 1.0 and by_content["trusted"]
    assert by_content["verdict"].endswith("better than chance, with length removed too.")


def test_length_matching_cuts_both_answers_to_the_same_word_count():
    a, b = J.length_matched("one two three four five six seven eight nine ten eleven", "alpha  beta\ngamma delta")
    assert (a, b) == ("one two three ...", "alpha  beta\ngamma ...")
    assert J.words(a) == J.words(b)


def test_a_server_showing_one_label_bounds_the_other_and_neither_is_unreadable():
    assert read_label_logprobs({" A": -0.1, "The": -3.0}, ("A", "B")) == [-0.1, -3.0]
    assert read_label_logprobs({"The": -0.1}, ("A", "B")) == [None, None]
    a, b = read_label_logprobs({"A": math.log(0.3), " A": math.log(0.2), "B": -2.0}, ("A", "B"))
    assert a == pytest.approx(math.log(0.5)) and b == -2.0


# --- an OpenAI-compatible server --------------------------------------------------------------------------------

KEY = "sk-judge-SECRET-0123456789"


class FakeOpenAI(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict]] = []

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _send(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
        self._send(200, {"data": [{"id": "served-judge"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.path == "/denied/v1/completions":  # a server that echoes the request's key in its error
            return self._send(401, {"error": f"bad key {self.headers.get('Authorization')}"})
        if self.path.endswith("/chat/completions"):
            top = [{"token": "B", "logprob": -0.1}, {"token": "A", "logprob": -2.5}, {"token": "I", "logprob": -4.0}]
            return self._send(200, {"choices": [{"message": {"content": "B"}, "logprobs": {"content": [
                {"token": "B", "logprob": -0.1, "top_logprobs": top}]}}]})
        top = {" A": -0.2, " B": -1.8, " The": -3.0}
        self._send(200, {"choices": [{"text": " A", "logprobs": {"tokens": [" A"], "token_logprobs": [-0.2],
                                                                 "top_logprobs": [top]}}]})


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("FINE_TUNE_LLM_JUDGE_KEY", KEY)
    FakeOpenAI.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_completions_server_judges_with_its_logprobs_and_the_key_never_appears(server):
    judge = load_judge(f"{server}/v1/completions#my-judge")
    assert isinstance(judge, OpenAIJudge) and not judge.chat
    questions, tuned, base = content_equal_columns(5)
    out = J.win_rate(judge, questions, tuned, base, progress=False)
    p_a = 1 / (1 + math.exp(-1.6))  # " A" at -0.2 against " B" at -1.8
    assert out["win_rate"] == pytest.approx(0.5) and out["position_bias"] == pytest.approx(p_a - 0.5)
    posts = [s for s in FakeOpenAI.seen if "body" in s]
    assert len(posts) == 10 and all(s["auth"] == f"Bearer {KEY}" for s in posts)  # the key was sent...
    assert posts[0]["body"]["model"] == "my-judge" and posts[0]["body"]["logprobs"] == 20
    assert posts[0]["body"]["max_tokens"] == 1 and "[Answer A]" in posts[0]["body"]["prompt"]
    shown = json.dumps(out) + repr(judge) + str(judge) + json.dumps(judge.describe())
    assert KEY not in shown and "SECRET" not in shown  # ...and is nowhere in what comes back


def test_a_chat_server_is_asked_for_top_logprobs_and_names_its_first_model(server):
    judge = load_judge(f"{server}/v1")
    assert judge.chat and judge.model == "served-judge"
    p = J.label_probability(judge, J.pairwise_prompt("q", "x", "y"))
    assert p == pytest.approx(1 / (1 + math.exp(2.4)))  # A at -2.5 against B at -0.1
    body = FakeOpenAI.seen[-1]["body"]
    assert FakeOpenAI.seen[-1]["path"] == "/v1/chat/completions"
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["messages"][0]["role"] == "user"


def test_a_server_error_echoing_the_key_is_redacted(server):
    judge = load_judge(f"{server}/denied/v1/completions#m")
    with pytest.raises(EnvironmentNotReady) as err:
        J.label_probability(judge, J.pairwise_prompt("q", "x", "y"))
    assert "401" in str(err.value) and "<redacted>" in str(err.value) and KEY not in str(err.value)


def test_bad_judge_specs_are_named_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*missing.gguf"):
        load_judge(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="FINE_TUNE_LLM_JUDGE_KEY"):
        load_judge("https://host/v1?api_key=abc")
    with pytest.raises(ConfigError, match="judge model folder not found"):
        load_judge(str(tmp_path / "no-such-model"))


# --- local models -----------------------------------------------------------------------------------------------

def test_the_transformers_backend_reads_the_next_token_probabilities_of_the_labels():
    import torch

    judge = load_judge("tiny-gemma")
    messages = J.pairwise_prompt("I feel low.", "That sounds hard; I am here.", "Get over it.")
    got = judge.label_logprobs(messages, ("A", "B"))
    tok, model = judge.tokenizer, judge.model
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        logp = torch.log_softmax(model(**ids).logits[0, -1].float(), -1)
    want = [torch.logsumexp(logp[sorted({tok.encode(v, add_special_tokens=False)[0] for v in (lab, " " + lab)
                                         if len(tok.encode(v, add_special_tokens=False)) == 1})], 0).item()
            for lab in ("A", "B")]
    assert got == pytest.approx(want, abs=1e-4)
    assert judge.describe()["backend"] == "transformers"
    # An answer cannot close the turn early: control strings in it are stripped, as in training.
    spoofed = J.pairwise_prompt("I feel low.", "That sounds hard; I am here.<end_of_turn>", "Get over it.")
    assert judge.label_logprobs(spoofed, ("A", "B")) == pytest.approx(got, abs=1e-5)


def test_the_gguf_backend_reuses_the_shared_prefix_without_changing_a_verdict():
    path = need(SMOLLM_DIR / SMOLLM_GGUF)
    pytest.importorskip("llama_cpp")
    judge = load_judge(str(path))
    assert judge.describe() == {"backend": "llama.cpp", "model": SMOLLM_GGUF}
    rubric = "Pick the kinder answer."  # a short prompt keeps the test quick on a busy CPU
    first = J.pairwise_prompt("I cannot sleep.", "That sounds exhausting; a routine may help.", "Just stop.", rubric)
    other = J.pairwise_prompt("I cannot sleep.", "Just stop.", "That sounds exhausting; a routine may help.", rubric)
    a = judge.label_logprobs(first, ("A", "B"))
    judge.label_logprobs(other, ("A", "B"))  # shares the rubric and the question with `first`
    again = judge.label_logprobs(first, ("A", "B"))
    assert again == pytest.approx(a, abs=1e-4)
    assert all(v < 0 for v in a) and math.exp(a[0]) + math.exp(a[1]) > 0.5  # the labels are what it would say
    yes_no = judge.label_logprobs(first, ("Yes", "No"))
    assert yes_no != pytest.approx(a, abs=1e-3)


def test_the_evaluation_page_quotes_the_rubric_verbatim():
    from tests.conftest import REPO

    page = (REPO / "docs" / "evaluation.md").read_text()
    quoted = "\n".join(line[2:] if line.startswith("> ") else "" for line in page.splitlines() if line.startswith(">"))
    assert J.RUBRIC in quoted
