"""An OpenAI-compatible HTTP server over the engine: what `vllm serve` gives, for any OpenAI client.

    python server.py --model PATH [--max-num-seqs 256 --max-model-len 4096 ...] [--host 127.0.0.1 --port 8000]

POST /v1/completions and /v1/chat/completions (stream false, or server-sent events ending in `data: [DONE]`),
GET /v1/models, GET /health. Request fields become SamplingParams under vLLM's names; a bad one is a 400 in
OpenAI's error shape, with the message SamplingParams or the chat template gave.

The idea: ONE engine thread owns the LLM and is the only one to call it (add_request, step, abort), as in-process
use does. Handlers put jobs on its inbox, a thread-safe queue it sleeps on when idle, and read the cumulative
outputs it hands back into their own asyncio queue (loop.call_soon_threadsafe). A client that goes away, mid-stream
or not, aborts its request at once (its blocks are freed, the batch goes on). Owns: HTTP, the OpenAI shapes, the
flags. Never touches: the engine's internals (only LLM's public API).
"""
import argparse
import asyncio
import contextlib
import itertools
import json
import queue
import threading
import time
import uuid
from dataclasses import replace

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from engine import LLM, SamplingParams

MAX_LOGPROBS = 20  # vLLM's max_logprobs: logprobs / top_logprobs above it are refused
# Request fields passed to SamplingParams as they are (vLLM's extras included); the rest are mapped below.
PASSED_FIELDS = ("n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
                 "skip_special_tokens")
# The LLM arguments the command line takes, under vLLM's flag names (--max-num-seqs ...); bools as --x / --no-x.
ENGINE_FLAGS = {"dtype": str, "max_num_seqs": int, "max_num_batched_tokens": int, "max_model_len": int,
                "block_size": int, "gpu_memory_utilization": float, "kv_cache_dtype": str, "seed": int,
                "long_prefill_token_threshold": int, "enable_prefix_caching": bool, "async_scheduling": bool,
                "enforce_eager": bool, "calculate_kv_scales": bool}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


class EngineLoop:
    """The thread that owns the LLM. Jobs: ("add", engine request ids, make_prompts(llm) -> one prompt per id,
    SamplingParams, send) answers send(None) once all are queued (or send(ValueError)), then send((index of the
    prompt, its cumulative RequestOutput)) after each step that moved it; ("abort", engine request ids)."""

    def __init__(self, llm: LLM):
        self.llm, self.inbox, self.routes = llm, queue.SimpleQueue(), {}  # engine request id -> (send, index)
        self.error: str | None = None  # set when the loop has ended: new requests get a 503
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def submit(self, job: tuple) -> None:
        if self.error is not None:
            raise APIError(503, self.error)
        self.inbox.put(job)

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join()

    def _run(self) -> None:
        try:
            while True:
                # Idle: sleep until a job comes. Busy: take what came during the step, then step again.
                jobs = [] if self.llm.has_unfinished_requests() else [self.inbox.get()]
                with contextlib.suppress(queue.Empty):
                    while True:
                        jobs.append(self.inbox.get_nowait())
                for job in jobs:
                    if job is None:
                        return
                    self._add(*job[1:]) if job[0] == "add" else self._abort(job[1])
                if self.llm.has_unfinished_requests():
                    for output in self.llm.step():
                        route = (self.routes.pop if output.finished else self.routes.get)(output.request_id, None)
                        if route is not None:  # (None: aborted meanwhile)
                            route[0]((route[1], output))
        except BaseException as error:  # the handlers waiting on it must hear of it
            self.error = f"the engine loop has died: {error!r}"
            raise
        finally:
            self.error = self.error or "the server is shutting down"
            for request_id, (send, _) in list(self.routes.items()):
                with contextlib.suppress(BaseException):
                    self._abort([request_id])
                send(APIError(503, self.error))

    def _add(self, request_ids, make_prompts, params, send) -> None:
        try:
            for index, (request_id, prompt) in enumerate(zip(request_ids, make_prompts(self.llm), strict=True)):
                self.llm.add_request(request_id, prompt, params)
                self.routes[request_id] = (send, index)
            send(None)
        except Exception as error:  # a bad request fails alone, and none of its prompts stays queued
            self._abort(request_ids)
            send(APIError(400, str(error)) if isinstance(error, ValueError) else APIError(500, repr(error)))

    def _abort(self, request_ids) -> None:
        for request_id in request_ids:
            if self.routes.pop(request_id, None) is not None:
                self.llm.abort(request_id)


def sampling_params(body: dict, defaults: SamplingParams, max_tokens, logprobs, logprobs_field: str,
                    echo: bool = False) -> SamplingParams:
    """The request's fields over the checkpoint's defaults (a 400 names a bad one)."""
    if type(logprobs) is int and logprobs > MAX_LOGPROBS:
        raise APIError(400, f"{logprobs_field} must be at most {MAX_LOGPROBS} (max_logprobs), got {logprobs}",
                       logprobs_field)
    fields = {name: body[name] for name in PASSED_FIELDS if body.get(name) is not None}
    try:
        return replace(defaults, **fields, max_tokens=max_tokens, stop=body.get("stop"), logprobs=logprobs,
                       prompt_logprobs=logprobs if echo else None)
    except ValueError as error:
        raise APIError(400, str(error)) from None


def completion_prompts(prompt) -> list:
    """OpenAI's prompt: a string, a list of strings, a list of token ids or a list of lists of ids."""
    if isinstance(prompt, str) or isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return prompt
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                        f"token ids, got {str(prompt)[:40]}", "prompt")


def floor(logprob: float) -> float:
    return max(logprob, -9999.0)  # JSON has no -inf (vLLM's floor)


def completion_logprobs(pairs, start: int, tokenizer) -> dict:
    """OpenAI's completions logprobs of pairs[start:]: (token id, {id: Logprob}, or None for a prompt's first)."""
    words = [entry[token].decoded_token if entry else tokenizer.decode([token]) for token, entry in pairs]
    offsets = list(itertools.accumulate(map(len, words), initial=0))
    return {"tokens": words[start:], "text_offset": offsets[start:-1],
            "token_logprobs": [floor(entry[token].logprob) if entry else None for token, entry in pairs[start:]],
            "top_logprobs": [entry and {e.decoded_token: floor(e.logprob) for e in entry.values()}
                             for _, entry in pairs[start:]]}


def chat_logprob(token: int, entry: dict, k: int) -> dict:
    """OpenAI's chat logprob of one token: itself, then the k most likely."""
    def one(logprob):
        word = logprob.decoded_token or ""
        return {"token": word, "logprob": floor(logprob.logprob), "bytes": list(word.encode())}
    top = sorted((e for e in entry.values() if e.rank <= k), key=lambda e: e.rank)
    return {**one(entry[token]), "top_logprobs": [one(e) for e in top]}


def build_app(llm: LLM, served_model_name: str) -> FastAPI:
    engine, defaults, tokenizer = EngineLoop(llm), llm.get_default_sampling_params(), llm.get_tokenizer()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.thread.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return JSONResponse(error.body(), error.status)

    @app.exception_handler(HTTPException)  # unknown routes (404), methods (405): OpenAI's shape too
    async def http_error(request, error: HTTPException):
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), error.status_code, error.headers)

    @app.get("/health")
    async def health():
        if engine.error is not None or not engine.thread.is_alive():
            raise APIError(503, engine.error or "the engine loop has not started")
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "engine"}]}

    async def submit(request_ids, make_prompts, params):
        """Queue a request on the engine thread; yield once it is queued (its error raises instead), then (index,
        cumulative RequestOutput) as they come. Closing it before the end aborts the request."""
        loop, inbox, running = asyncio.get_running_loop(), asyncio.Queue(), set(range(len(request_ids)))
        engine.submit(("add", request_ids, make_prompts, params,
                       lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item)))
        try:
            while running:
                if isinstance(item := await inbox.get(), Exception):
                    raise item
                if item is not None and item[1].finished:
                    running.discard(item[0])
                    if item[1].error is not None:
                        raise APIError(400, item[1].error)
                yield item
        finally:  # a client that went away (a cancelled task, a closed stream)
            if running and engine.error is None:
                engine.inbox.put(("abort", request_ids))

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, served_model_name):
            raise APIError(400, f"The model `{body['model']}` does not exist; served: {served_model_name}", "model")
        return body

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        prompts, echo = completion_prompts(body.get("prompt")), bool(body.get("echo"))
        params = sampling_params(body, defaults, body.get("max_tokens", 16), body.get("logprobs"), "logprobs", echo)

        def choice(index, output, completion, sent):  # the new text and logprobs of one choice
            prefix = (output.prompt if output.prompt is not None else tokenizer.decode(output.prompt_token_ids)) \
                if echo else ""
            text, logprobs = (prefix + completion.text)[sent[0]:], None
            if completion.logprobs is not None:
                pairs = [*zip(output.prompt_token_ids, output.prompt_logprobs)] if echo else []
                pairs += zip(completion.token_ids, completion.logprobs)
                logprobs, sent[1] = completion_logprobs(pairs, sent[1], tokenizer), len(pairs)
            sent[0] += len(text)
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": completion.finish_reason,
                    "stop_reason": completion.stop_reason}
        return await respond(request, body, "cmpl", ("text_completion",) * 2, len(prompts), lambda llm: prompts,
                             params, choice)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        top_logprobs = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        params = sampling_params(body, defaults, max_tokens, top_logprobs, "top_logprobs")
        options = dict(add_generation_prompt=body.get("add_generation_prompt", True), tools=body.get("tools"),
                       continue_final_message=body.get("continue_final_message", False),
                       chat_template_kwargs=body.get("chat_template_kwargs"))

        def choice(index, output, completion, sent):
            text, first, logprobs, sent[2] = completion.text[sent[0]:], not sent[2], None, True
            if completion.logprobs is not None:
                logprobs = {"content": [chat_logprob(token, entry, top_logprobs) for token, entry in zip(
                    completion.token_ids[sent[1]:], completion.logprobs[sent[1]:])]}
                sent[1] = len(completion.logprobs)
            sent[0] += len(text)
            message = {"role": "assistant", "content": text} if first or not body.get("stream") else {"content": text}
            return {"index": index, "delta" if body.get("stream") else "message": message, "logprobs": logprobs,
                    "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
        make_prompts = lambda llm: [llm.chat_prompt(body.get("messages"), **options)]  # noqa: E731
        return await respond(request, body, "chatcmpl", ("chat.completion", "chat.completion.chunk"), 1,
                             make_prompts, params, choice)

    async def respond(request, body, prefix, objects, num_prompts, make_prompts, params, choice):
        """Run the request; answer with the whole result, or stream it. choice(number, output, completion, sent)
        gives a choice's part not sent yet (sent: [characters, logprob entries, started], updated)."""
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        outputs = submit([f"{request_id}-{i}" for i in range(num_prompts)], make_prompts, params)
        await anext(outputs)  # queued, or the request's error raises here: a stream starts only for a good request
        head = {"id": request_id, "object": objects[0], "created": int(time.time()), "model": served_model_name}
        if body.get("stream"):
            usage = (body.get("stream_options") or {}).get("include_usage", False)
            head["object"] = objects[1]
            return StreamingResponse(stream(outputs, head, params.n, choice, usage), media_type="text/event-stream")
        finals = await until_disconnected(request, collect(outputs))
        choices = [choice(i * params.n + c.index, output, c, [0, 0, False]) for i, output in enumerate(finals)
                   for c in output.outputs]
        return {**head, "choices": choices, "usage": usage_of(finals)}

    async def stream(outputs, head, n, choice, include_usage):
        last, sent, done = {}, {}, set()
        try:
            async for index, output in outputs:
                last[index] = output
                for completion in output.outputs:
                    if (number := index * n + completion.index) in done:
                        continue
                    before = list(state := sent.setdefault(number, [0, 0, False]))
                    part = choice(number, output, completion, state)
                    if state != before or completion.finish_reason is not None:  # something new, or the end
                        done.update([number] if completion.finish_reason is not None else [])
                        yield f"data: {json.dumps({**head, 'choices': [part]}, ensure_ascii=False)}\n\n"
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage_of(last.values())})}\n\n"
        except APIError as error:  # the engine died, or the request failed on the way: say so in the stream
            yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"

    return app


async def collect(outputs) -> list:
    """The final RequestOutput of each prompt, in order."""
    finals = {}
    async for index, output in outputs:
        finals[index] = output
    return [finals[index] for index in sorted(finals)]


async def until_disconnected(request: Request, coroutine):
    """The coroutine's result; if the client goes away first, it is cancelled (a submit() in it aborts)."""
    work, gone = asyncio.ensure_future(coroutine), asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        work.cancel()  # (nothing, when it is done)
    with contextlib.suppress(asyncio.CancelledError):
        return await work
    raise APIError(499, "the client closed the connection")


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage_of(outputs) -> dict:
    prompt = sum(len(output.prompt_token_ids) for output in outputs)
    completion = sum(len(c.token_ids) for output in outputs for c in output.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="An OpenAI-compatible server (vLLM's flag names).")
    parser.add_argument("--model", required=True, help="a Hugging Face checkpoint directory")
    parser.add_argument("--served-model-name", help="the name clients ask for (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    for name, kind in ENGINE_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, action=argparse.BooleanOptionalAction) if kind is bool else \
            parser.add_argument(flag, type=kind)
    args = parser.parse_args(argv)
    engine_args = {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None}
    if engine_args.get("dtype") == "auto":
        del engine_args["dtype"]
    app = build_app(LLM(args.model, **engine_args), args.served_model_name or args.model)
    # Ctrl-C / SIGTERM: uvicorn stops taking requests, gives open streams 5 s, then the engine thread stops.
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
