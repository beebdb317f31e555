"""lm-evaluation-harness through ``cctuning serve``: lm-eval's ``local-completions`` model pointed at the
server scores a shipped generative task as ``cctuning lm-eval --model cctuning`` does with the same
connection; echoed log-probabilities (connection none) are what lm-eval's parser turns into
``cctuning lm-eval``'s log-likelihoods. Offline."""

import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity (pip install 'lm-eval[api]')")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

from cctuning.eval.lmeval import CCLM, task_manager  # noqa: E402
from cctuning.inference import CCGenerator  # noqa: E402
from cctuning.loading import load_for_inference  # noqa: E402
from cctuning.serve.server import Server, bind, build  # noqa: E402
from tests.conftest import connected_model  # noqa: E402
from tests.serve.test_api import call  # noqa: E402

TASK = "cctuning_mkqa_de"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("lmeval") / "cc"
    connected_model(tokenizer, seed=3).save_pretrained(folder, tokenizer=tokenizer)
    model, tok, _ = load_for_inference(str(folder), device="cpu")
    built = build(CCGenerator(model, tok, max_new_tokens=40), "cc", max_batch_size=4)
    srv = Server(built.app, bind("127.0.0.1", 0)).start()
    yield folder, srv.url
    srv.stop()
    built.engine.stop()


@pytest.fixture(scope="module")
def tasks():
    """Our tasks only: lm-eval's own index of its thousands of tasks takes half a minute to build."""
    return task_manager(include_defaults=False)


def run_lm_eval(tasks, model: str, model_args: str) -> tuple[dict, list[dict]]:
    """What ``cctuning lm-eval --model MODEL --model_args ARGS --tasks TASK --limit 4
    --apply_chat_template --log_samples`` computes (lm-eval's ``simple_evaluate``, with ``tasks``)."""
    out = simple_evaluate(model=model, model_args=model_args, tasks=[TASK], limit=4, apply_chat_template=True,
                          log_samples=True, task_manager=tasks)  # fmt: skip
    return out["results"][TASK], sorted(out["samples"][TASK], key=lambda s: s["doc_id"])


@pytest.mark.slow
def test_local_completions_scores_what_cctuning_lm_eval_scores(served, tasks):
    folder, url = served
    api = f"model=cc,base_url={url}/v1/completions,tokenizer={folder},tokenizer_backend=huggingface,num_concurrent=4"
    theirs, their_samples = run_lm_eval(tasks, "local-completions", api)
    ours, our_samples = run_lm_eval(
        tasks, "cctuning", f"pretrained={folder},connection=transform,batch_size=4"
    )
    assert len(their_samples) == 4
    assert [s["filtered_resps"] for s in their_samples] == [s["filtered_resps"] for s in our_samples]
    assert any(s["filtered_resps"][0] for s in our_samples), "empty answers would compare equal anyway"
    for metric in ("exact_match,none", "f1,none", "contains,none"):
        assert theirs[metric] == ours[metric]


def test_echoed_logprobs_are_lm_evals_log_likelihoods_with_connection_none(served):
    folder, url = served
    model, tok, _ = load_for_inference(
        str(folder), device="cpu"
    )  # not the server's: its own thread runs that
    pairs = [
        ("<s><|im_start|>user\nHabari?<|im_end|>\n<|im_start|>assistant\n", "Nzuri sana."),
        ("ما هي", " القاهرة"),
    ]
    requests = [
        Instance("loglikelihood", {}, pair, idx=0, metadata=("t", i, 1)) for i, pair in enumerate(pairs)
    ]
    lm = CCLM(model, tokenizer=tok, connection="none", batch_size=2)
    want = lm.loglikelihood(requests, disable_tqdm=True)
    got = []
    for context, continuation in pairs:
        ctx, cont = lm._encode_pair(context, continuation)
        body = {
            "model": "cc@none",
            "prompt": ctx + cont,
            "echo": True,
            "logprobs": 1,
            "max_tokens": 1,
            "temperature": 0,
        }
        status, answer = call(url, "POST", "/v1/completions", body=body)
        assert status == 200, answer
        got += LocalCompletionsAPI.parse_logprobs(answer, ctxlens=[len(ctx)])
    for (lp, greedy), (want_lp, want_greedy) in zip(got, want):
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
    assert want[0][0] != pytest.approx(CCLM(model, tokenizer=tok, connection="transform").loglikelihood(requests[:1], disable_tqdm=True)[0][0], abs=1e-3)  # fmt: skip
