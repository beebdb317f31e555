"""A ``--augment bilingual-prompt`` model served: a chat request's ``english`` goes inside the prompt
(English, then non-English, as training rendered it), with any connection; without it the prompt is
the non-English one alone, which the answer and the log say. Compared with the generator given the
bilingual text written by :func:`bilingual_instruction`."""

import logging

import openai
import pytest

from cctuning.data.augment import bilingual_instruction
from cctuning.inference import CCGenerator
from cctuning.serve.server import Server, bind, build
from tests.conftest import connected_model
from tests.serve.conftest import ENGLISH, PROMPTS

NEW = 8


@pytest.fixture(scope="module")
def served(tokenizer):
    model = connected_model(tokenizer, seed=5)
    model.cc_config.augment = "bilingual-prompt"
    gen = CCGenerator(model, tokenizer, max_new_tokens=NEW)
    built = build(gen, "bi", max_tokens=NEW)
    srv = Server(built.app, bind("127.0.0.1", 0)).start()
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120), gen
    srv.stop()
    built.engine.stop()


def chat(client, prompt, **extra):
    answer = client.chat.completions.create(
        model="bi", messages=[{"role": "user", "content": prompt}], max_tokens=NEW, temperature=0,
        extra_body=extra or None,
    )  # fmt: skip
    return answer.choices[0].message.content, answer.choices[0].model_extra["cctuning"]


def expected(gen, text, connection, english=None, bilingual=True):
    out = gen.generate([text], connection, english=english)[0]
    return out.text, {"connection": connection, "layer": out.layer, "bilingual_prompt": bilingual}


def test_the_english_goes_inside_the_prompt(served, caplog):
    client, gen = served
    for prompt, english in zip(PROMPTS[:3], ENGLISH[:3]):
        both = bilingual_instruction(prompt, english)
        assert chat(client, prompt, english=english) == expected(gen, both, "transform")
        assert chat(client, prompt, english=english, connection="none") == expected(gen, both, "none")
        # the oracle: the English in the prompt and its activations through the connection
        assert chat(client, prompt, english=english, connection="english") == expected(
            gen, both, "english", english=[english]
        )
    with caplog.at_level(logging.WARNING, logger="cctuning.data.augment"):
        alone = chat(client, PROMPTS[0])
    assert alone == expected(gen, PROMPTS[0], "transform", bilingual=False)
    assert alone[0] != chat(client, PROMPTS[0], english=ENGLISH[0])[0]
    assert "1 of 1 prompts have no English instruction" in caplog.text


def test_a_completion_takes_its_prompt_as_written(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError, match="reads it in chat requests only"):
        client.completions.create(
            model="bi", prompt="hi", max_tokens=2, extra_body={"english": "hi", "connection": "none"}
        )
