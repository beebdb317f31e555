"""``cctuning serve``: an OpenAI-compatible HTTP server with the connection, and a chat page
(docs/serving.md).

* :mod:`.sequence`: one choice being generated, its text and stop rules, its events;
* :mod:`.batch`: the running batch (connected prefill shared with ``cctuning generate``, joining,
  decoding steps, leaving);
* :mod:`.engine`: the thread that owns the model, its bounded queue, the scoring of echoed prompts;
* :mod:`.protocol`, :mod:`.prompts`: request fields and prompts, checked, with OpenAI-shaped errors;
* :mod:`.runs`, :mod:`.scoring`: a request's sequences and its answer, whole or streamed;
* :mod:`.app`: the FastAPI app (``pip install cctuning[serve]``; only this module imports FastAPI);
  ``static/chat.html``: the chat page.
"""
