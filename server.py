"""An OpenAI-compatible HTTP server over the engine, for any OpenAI client (what `vllm serve` gives):

    python server.py --model PATH [--max-num-seqs 256 --max-model-len 4096 ...] [--host 127.0.0.1 --port 8000]

POST /v1/completions and /v1/chat/completions (whole, or streamed as server-sent events), GET /v1/models, GET
/health. Request fields become SamplingParams (vLLM's names); errors come in OpenAI's shape.

The idea: ONE engine thread owns the LLM and is the only one to call it (add_request, step, abort). The HTTP front
end (FastAPI on uvicorn) runs in a process of its own, as vLLM's API server does: in one process the handlers' JSON
and socket writes and the engine's host work take turns on one interpreter lock, and the engine waits. The two talk
through a pipe: jobs one way (add, abort), and after each step one message back with the outputs that moved. A
handler gets cumulative outputs and sends the newest it has; a client that goes away aborts its request at once.
Owns: HTTP, the OpenAI shapes, the flags. Never touches: the engine's internals (only LLM's public API).
"""
import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import replace

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from engine import LLM, CompletionOutput, RequestOutput, SamplingParams

MAX_LOGPROBS = 20  # vLLM's max_logprobs: logprobs / top_logprobs above it are refused
# Request fields passed to SamplingParams as they are (vLLM's extras included); the rest are mapped below.
PASSED_FIELDS = ("n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
                 "skip_special_tokens")


def json_argument(text: str):
    """--speculative-config '{"method": "ngram", "num_speculative_tokens": 4}': vLLM's spelling, a JSON object."""
    return json.loads(text)


# The LLM arguments the command line takes, under vLLM's flag names.
ENGINE_FLAGS = {"dtype": lambda name: None if name == "auto" else name, "max_num_seqs": int, "max_model_len": int,
                "max_num_batched_tokens": int, "block_size": int, "gpu_memory_utilization": float, "seed": int,
                "kv_cache_dtype": str, "long_prefill_token_threshold": int, "enable_prefix_caching": bool,
                "async_scheduling": bool, "enforce_eager": bool, "calculate_kv_scales": bool,
                "budget_counts_attention": bool, "quantization": str, "tensor_parallel_size": int,
                "speculative_config": json_argument}
# Online defaults: a budget that counts attention keeps each step's time, hence the inter-token latency, steadier
# while long documents are prefilled (BENCHMARKS.md, mixed workload, H100: p99 / p50 1.71x, 1.24x, 1.26x,
# 1.75x and 1.88x in five runs, against 3.69x to 4.08x at 8,192)
SERVER_DEFAULTS = {"max_num_batched_tokens": 4096, "budget_counts_attention": True}


STARTUP_TIMEOUT = 120  # seconds for the front end's process to import FastAPI and start taking requests (takes 2-5)


class APIError(HTTPException):
    """A request that fails: status code and message (starlette's own 404 and 405 are HTTPExceptions too)."""


def error_body(error: HTTPException) -> dict:
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"  # OpenAI's shape
    return {"error": {"message": str(error.detail), "type": kind, "param": None, "code": error.status_code}}


class Server:
    """Both halves, running: the engine loop over `llm` on a thread of this process, and the HTTP front end in a
    process of its own serving on host:port (bound here, so a busy port fails here; port 0: a free one, `port` says
    which). close() stops the front end (open streams get 5 s), after which the loop aborts what is left and ends."""

    def __init__(self, llm: LLM, served_model_name: str, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "info"):
        (ours, theirs), context = multiprocessing.Pipe(), multiprocessing.get_context("spawn")
        ready = context.Event()  # set once uvicorn takes requests
        with socket.create_server((host, port)) as sock:  # (the front end serves on its own copy)
            self.port = sock.getsockname()[1]
            self.frontend = context.Process(target=serve_http, name="server-frontend", args=(
                theirs, ready, sock, llm.get_default_sampling_params(), llm.get_tokenizer(), served_model_name,
                log_level))
            self.frontend.start()
        theirs.close()  # the front end's end lives in its process alone: its exit is this end's EOF
        self.engine = EngineLoop(llm, ours)
        self.engine.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not ready.wait(0.1):
            if not self.frontend.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server's front end did not start (it is given {STARTUP_TIMEOUT} s; its exit "
                                   f"code: {self.frontend.exitcode})")

    def close(self) -> None:
        if self.frontend.is_alive():
            self.frontend.terminate()  # SIGTERM: uvicorn's graceful shutdown
        self.frontend.join(30)
        if self.frontend.is_alive():
            self.frontend.kill()
            self.frontend.join()
        self.engine.thread.join()


class EngineLoop:
    """The thread that owns the LLM. Jobs from the pipe, taken between steps (it sleeps on the pipe when idle): ("add",
    engine request ids, prompts: a list, or chat_prompt()'s arguments as a dict, SamplingParams), answered with
    (first id, None) once all are queued or (first id, (status, message)); ("abort", engine request ids). After
    each step one message: (those answers, [(request id, what is new of its output: _news)], None), or ([], [], why)
    if the loop dies. The pipe's end (the front end gone) stops it, and its requests."""

    def __init__(self, llm: LLM, connection):
        self.llm, self.connection, self.answers = llm, connection, []  # answers: the adds' since the last message
        # engine request id running -> per completion (tokens, characters) sent so far; None before its first output
        self.live: dict[str, list[tuple[int, int]] | None] = {}
        self.thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)

    def _loop(self) -> None:
        try:
            while True:
                jobs = not self.llm.has_unfinished_requests() or self.connection.poll()  # idle: wait for one
                while jobs:
                    job = self.connection.recv()
                    self._add(*job[1:]) if job[0] == "add" else self._abort(job[1])
                    jobs = self.connection.poll()
                outputs = [(output.request_id, self._news(output)) for output in (
                    self.llm.step() if self.llm.has_unfinished_requests() else [])
                           if output.request_id in self.live]  # (not: aborted meanwhile)
                if self.answers or outputs:
                    self.connection.send((self.answers, outputs, None))
                    self.answers = []
        except (EOFError, BrokenPipeError, ConnectionResetError):  # the front end has gone: so have its clients
            self._abort(list(self.live))
        except BaseException as error:
            with contextlib.suppress(OSError):
                self.connection.send(([], [], f"the engine loop has died: {error!r}"))
            raise
        finally:
            self.connection.close()

    def _news(self, output: RequestOutput):
        """What the pipe carries of a step's output: the first one whole (the prompt, maybe thousands of ids, goes
        once), later ones only what is new, in plain tuples: (finished, error, per completion (token ids, text,
        logprobs, cumulative logprob, finish reason, stop reason)). Not the RequestOutput: a dataclass pickles
        through its class, several times slower than tuples, and this thread pays for it every step."""
        sent = self.live[output.request_id]
        if output.finished:
            del self.live[output.request_id]
        else:
            self.live[output.request_id] = [(len(c.token_ids), len(c.text)) for c in output.outputs]
        if sent is None:
            return output
        return output.finished, output.error, [
            (c.token_ids[a:], c.text[b:], c.logprobs and c.logprobs[a:], c.cumulative_logprob, c.finish_reason,
             c.stop_reason) for c, (a, b) in zip(output.outputs, sent)]

    def _add(self, request_ids, prompts, params) -> None:
        try:
            if isinstance(prompts, dict):
                prompts = [self.llm.chat_prompt(**prompts)]
            for request_id, prompt in zip(request_ids, prompts, strict=True):
                self.llm.add_request(request_id, prompt, params)
                self.live[request_id] = None
            self.answers.append((request_ids[0], None))
        except Exception as error:  # a bad request fails alone, and none of its prompts stays queued
            self._abort(request_ids)
            status = 400 if isinstance(error, ValueError) else 500
            self.answers.append((request_ids[0], (status, str(error) if status == 400 else repr(error))))

    def _abort(self, request_ids) -> None:
        for request_id in request_ids:
            if request_id in self.live:
                del self.live[request_id]
                self.llm.abort(request_id)


class EngineClient:
    """The front end's way to the engine loop, for handlers on the event loop: run() a request, get its outputs.
    The pipe is worked by two threads of its own, blocking: one sends the jobs (a long prompt must not stall the event
    loop while the engine is in a step), one receives the engine's messages and hands each to the event loop. Not
    the loop's add_reader: uvloop (uvicorn's loop where it is installed) makes a watched fd non-blocking, and then a
    large message is read, or written, in part: the stream breaks (BENCHMARKS.md: the runs through it that hung)."""

    def __init__(self, connection):
        self.connection, self.jobs, self.error = connection, queue.SimpleQueue(), None  # error: requests get a 503
        self.routes = {}  # engine request id -> [the handler's asyncio queue, prompt index, its last output]
        self.sender = threading.Thread(target=self._send, name="frontend-sender", daemon=True)
        self.receiver = threading.Thread(target=self._receive, name="frontend-receiver", daemon=True)
        self.on_gone = lambda: None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sender.start()
        self.receiver.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.sender.join(5)  # (bounded: an engine loop blocked sending to us reads no more jobs)
        # shutdown, not close: it ends the engine loop's reads (it aborts what is left) and wakes our receiver
        with socket.socket(fileno=os.dup(self.connection.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        self.receiver.join(5)
        self.connection.close()

    async def run(self, request_ids: list[str], prompts, params: SamplingParams):
        """Queue a request; yield None once it is queued (its error raises instead), then (prompt index, cumulative
        RequestOutput) as they come. Closed before the end (a client gone, a task cancelled), it aborts the request."""
        if self.error is not None:
            raise APIError(503, self.error)
        answers, running = asyncio.Queue(), set(range(len(request_ids)))
        self.routes.update({request_id: [answers, i, None] for i, request_id in enumerate(request_ids)})
        self.jobs.put(("add", request_ids, prompts, params))
        try:
            while running:
                items, newest = [await answers.get()], {}
                while not answers.empty():  # behind the engine: outputs are cumulative, so a prompt's newest says
                    items.append(answers.get_nowait())  # all (one chunk for several steps, as vLLM merges them)
                for item in items:
                    if isinstance(item, Exception):
                        raise item
                    if item is None:
                        yield None
                    else:
                        newest[item[0]] = item
                for index, output in newest.values():
                    if output.finished:
                        running.discard(index)
                        if output.error is not None:  # it failed on the way (e.g. it outgrew the KV cache)
                            raise APIError(400, output.error)
                    yield index, output
        finally:
            for request_id in request_ids:
                self.routes.pop(request_id, None)
            if running and self.error is None:
                self.jobs.put(("abort", request_ids))

    def _send(self) -> None:
        for job in iter(self.jobs.get, None):
            with contextlib.suppress(OSError):  # (the engine's end has gone: _receive says so)
                self.connection.send(job)

    def _receive(self) -> None:
        """On its own thread: each message of the engine loop, in order, to _route on the event loop."""
        try:
            while True:
                self.loop.call_soon_threadsafe(self._route, self.connection.recv())
        except (EOFError, OSError) as error:
            with contextlib.suppress(RuntimeError):  # (the event loop has closed: the front end has stopped)
                self.loop.call_soon_threadsafe(self._fail, f"the engine has gone ({error!r})")

    def _route(self, message) -> None:
        answers, outputs, death = message
        for request_id, error in answers:  # an add's: queued (None), or (status, message)
            if (route := self.routes.get(request_id)) is not None:
                route[0].put_nowait(error and APIError(*error))
        for request_id, news in outputs:
            if (route := self.routes.get(request_id)) is not None:  # (None: aborted meanwhile)
                route[0].put_nowait(self._cumulative(route, news))
        if death is not None:
            self._fail(death)

    @staticmethod
    def _cumulative(route, news) -> tuple[int, RequestOutput]:
        """(prompt index, the output so far), from the last one and what EngineLoop._news sent: new objects (a
        handler compares them with the last it sent)."""
        if not isinstance(news, RequestOutput):
            last, (finished, error, completions) = route[2], news
            news = RequestOutput(last.request_id, last.prompt, last.prompt_token_ids, last.prompt_logprobs, [
                CompletionOutput(before.index, before.text + text, before.token_ids + token_ids, cumulative,
                                 None if logprobs is None else before.logprobs + logprobs, finish_reason, stop_reason)
                for before, (token_ids, text, logprobs, cumulative, finish_reason, stop_reason)
                in zip(last.outputs, completions)], finished, last.num_cached_tokens, error)
        route[2] = news
        return route[1], news

    def _fail(self, message: str) -> None:
        """The engine loop has died or gone: every request waiting hears of it, and later ones get a 503."""
        if self.error is not None:  # (its death message came first; the pipe's end follows it)
            return
        self.error = message
        for answers in {id(route[0]): route[0] for route in self.routes.values()}.values():
            answers.put_nowait(APIError(503, message))
        self.routes.clear()
        self.on_gone()


def sampling_params(body: dict, defaults: SamplingParams, max_tokens, logprobs, logprobs_field: str,
                    echo: bool = False) -> SamplingParams:
    """The request's fields over the checkpoint's defaults (a 400 names a bad one)."""
    if type(logprobs) is int and logprobs > MAX_LOGPROBS:
        raise APIError(400, f"{logprobs_field} must be at most {MAX_LOGPROBS} (max_logprobs), got {logprobs}")
    fields = {name: body[name] for name in PASSED_FIELDS if body.get(name) is not None}
    try:
        return replace(defaults, **fields, max_tokens=max_tokens, stop=body.get("stop"), logprobs=logprobs,
                       prompt_logprobs=logprobs if echo else None)
    except ValueError as error:
        raise APIError(400, str(error)) from None


def floor(logprob: float) -> float:
    return max(logprob, -9999.0)  # JSON has no -inf (vLLM's floor)


def completion_logprobs(pairs, offset: int, tokenizer) -> dict:
    """OpenAI's completions logprobs of (token id, {id: Logprob}, or None for a prompt's first) pairs whose text
    starts at character `offset`."""
    words = [entry[token].decoded_token if entry else tokenizer.decode([token]) for token, entry in pairs]
    return {"tokens": words, "text_offset": list(itertools.accumulate(map(len, words[:-1]), initial=offset)),
            "token_logprobs": [floor(entry[token].logprob) if entry else None for token, entry in pairs],
            "top_logprobs": [entry and {e.decoded_token: floor(e.logprob) for e in entry.values()}
                             for _, entry in pairs]}


def chat_logprob(token: int, entry: dict, k: int) -> dict:
    """OpenAI's chat logprob of one token: itself, then the k most likely."""
    def one(logprob):
        word = logprob.decoded_token or ""
        return {"token": word, "logprob": floor(logprob.logprob), "bytes": list(word.encode())}
    top = sorted((e for e in entry.values() if e.rank <= k), key=lambda e: e.rank)
    return {**one(entry[token]), "top_logprobs": [one(e) for e in top]}


def build_app(engine: EngineClient, defaults: SamplingParams, tokenizer, served_model_name: str, ready) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        ready.set()
        yield
        engine.stop()

    app = FastAPI(lifespan=lifespan)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        return JSONResponse(error_body(error), error.status_code, error.headers)

    @app.get("/health")
    async def health():
        if engine.error is not None:
            raise APIError(503, engine.error)
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "engine"}]}

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, served_model_name):
            raise APIError(400, f"The model `{body['model']}` does not exist; served: {served_model_name}")
        return body

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        # OpenAI's prompt: a string, a list of strings, a list of token ids or a list of lists of ids
        prompt, echo = body.get("prompt"), bool(body.get("echo"))
        prompts = prompt if isinstance(prompt, list) and any(type(t) is not int for t in prompt) else [prompt]
        params = sampling_params(body, defaults, body.get("max_tokens", 16), body.get("logprobs"), "logprobs", echo)

        def choice(index, output, completion, previous):
            (text, start), first = news(completion, previous), previous is None
            prompt = "" if not echo else output.prompt if output.prompt is not None else tokenizer.decode(
                output.prompt_token_ids)  # echo: the prompt comes first
            logprobs = None if completion.logprobs is None else completion_logprobs(
                [*zip(output.prompt_token_ids, output.prompt_logprobs or [])] * (echo and first)
                + [*zip(completion.token_ids[start:], completion.logprobs[start:])],
                0 if first else len(prompt) + len(previous.text), tokenizer)
            return {"index": index, "text": prompt * first + text, "logprobs": logprobs,
                    "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
        return await respond(request, body, "cmpl", ("text_completion",) * 2, prompts, params, choice)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            raise APIError(400, "top_logprobs needs logprobs: true")
        top_logprobs = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        params = sampling_params(body, defaults, max_tokens, top_logprobs, "top_logprobs")
        options = {name: body[name] for name in ("add_generation_prompt", "continue_final_message", "tools",
                                                 "chat_template_kwargs") if body.get(name) is not None}

        def choice(index, output, completion, previous):
            text, start = news(completion, previous)
            logprobs = None if completion.logprobs is None else {"content": [
                chat_logprob(token, entry, top_logprobs)
                for token, entry in zip(completion.token_ids[start:], completion.logprobs[start:])]}
            message = {"content": text} if previous else {"role": "assistant", "content": text}
            return {"index": index, "delta" if body.get("stream") else "message": message, "logprobs": logprobs,
                    "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
        return await respond(request, body, "chatcmpl", ("chat.completion", "chat.completion.chunk"),
                             dict(options, conversation=body.get("messages")), params, choice)

    async def respond(request, body, prefix, objects, prompts, params, choice):
        """Run the request; answer with the whole result, or stream it. choice(number, output, completion, previous)
        is one choice's part that `previous` (an earlier output of that completion, or None) did not have."""
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        if body.get("return_token_ids"):  # vLLM's extension: the ids beside the text (what RL rollouts train on)
            choice = with_token_ids(choice)
        num_prompts = 1 if isinstance(prompts, dict) else len(prompts)  # (a dict: a chat, rendered by the engine)
        outputs = engine.run([f"{request_id}-{i}" for i in range(num_prompts)], prompts, params)
        await anext(outputs)  # queued, or the request's error raises here: a stream starts only for a good request
        head = {"id": request_id, "object": objects[0], "created": int(time.time()), "model": served_model_name}
        if body.get("stream"):
            usage = (body.get("stream_options") or {}).get("include_usage", False)
            return StreamingResponse(stream(outputs, {**head, "object": objects[1]}, params.n, choice, usage),
                                     media_type="text/event-stream")
        finals = await until_disconnected(request, outputs)
        choices = [choice(i * params.n + c.index, output, c, None) for i, output in enumerate(finals)
                   for c in output.outputs]
        return {**head, "choices": choices, "usage": usage_of(finals)}

    async def stream(outputs, head, n, choice, include_usage):
        last, sent = {}, {}  # prompt index -> its last output; choice number -> its last completion sent
        try:
            async for index, output in outputs:
                last[index] = output
                for completion in output.outputs:
                    previous = sent.get(number := index * n + completion.index)
                    if previous is None or previous.finish_reason is None and (  # news (a sibling may have moved)
                            len(completion.token_ids) > len(previous.token_ids) or completion.finish_reason):
                        yield sse({**head, "choices": [choice(number, output, completion, previous)]})
                        sent[number] = completion
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage_of(last.values())})
        except APIError as error:  # the engine died, or the request failed on the way: say so in the stream
            yield sse(error_body(error))
        yield "data: [DONE]\n\n"

    return app


async def until_disconnected(request: Request, outputs) -> list:
    """The final output of each prompt, in order; if the client goes away first, outputs is closed (it aborts)."""
    async def finals():
        return [output for _, output in sorted([item async for item in outputs if item[1].finished])]
    # The body has been read: the next message the client's connection can bring is its end (http.disconnect).
    work, gone = asyncio.ensure_future(finals()), asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        work.cancel()  # (nothing, when it is done)
    with contextlib.suppress(asyncio.CancelledError):
        return await work
    raise APIError(499, "the client closed the connection")


def news(completion, previous) -> tuple[str, int]:
    """What a cumulative completion adds to `previous`, an earlier one (None: nothing sent): text, first new token."""
    return (completion.text, 0) if previous is None else (completion.text[len(previous.text):], len(previous.token_ids))


def with_token_ids(choice):
    """choice() with the completion's new token ids, and in its first part the prompt's."""
    def choice_with_ids(number, output, completion, previous):
        start = news(completion, previous)[1]
        prompt = {"prompt_token_ids": output.prompt_token_ids} if previous is None else {}
        return {**choice(number, output, completion, previous), **prompt, "token_ids": completion.token_ids[start:]}
    return choice_with_ids


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage_of(outputs) -> dict:
    prompt = sum(len(output.prompt_token_ids) for output in outputs)
    completion = sum(len(c.token_ids) for output in outputs for c in output.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    """The command line, and the LLM arguments in it (SERVER_DEFAULTS where not given)."""
    parser = argparse.ArgumentParser(description="An OpenAI-compatible server (vLLM's flag names).")
    parser.add_argument("--model", required=True, help="a Hugging Face checkpoint directory")
    parser.add_argument("--served-model-name", help="the name clients ask for (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    for name, kind in ENGINE_FLAGS.items():  # --enable-prefix-caching / --no-enable-prefix-caching, --max-num-seqs N
        parser.add_argument("--" + name.replace("_", "-"), **(
            {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}))
    parser.set_defaults(**SERVER_DEFAULTS)
    args = parser.parse_args(argv)
    return args, {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None}


def serve_http(connection, ready, sock: socket.socket, defaults: SamplingParams, tokenizer, served_model_name: str,
               log_level: str) -> None:
    """The front end's process: the app on uvicorn, on the socket the engine's process bound. In a process group of
    its own, so that a Ctrl-C reaches the engine's process alone, which passes it on once."""
    os.setpgrp()
    engine = EngineClient(connection)
    server = uvicorn.Server(uvicorn.Config(build_app(engine, defaults, tokenizer, served_model_name, ready),
                                           log_level=log_level, timeout_graceful_shutdown=5))
    engine.on_gone = lambda: setattr(server, "should_exit", True)  # the engine's process has died: so do we
    server.run(sockets=[sock])


def main(argv=None) -> None:
    args, engine_args = parse_args(argv)
    llm = LLM(args.model, **engine_args)
    server = Server(llm, args.served_model_name or args.model, args.host, args.port)
    # Ctrl-C / SIGTERM: the front end stops taking requests and gives open streams 5 s, then the engine loop ends.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.frontend.terminate())
    server.frontend.join()
    server.close()
    llm.close()
    if server.frontend.exitcode not in (0, -signal.SIGTERM):  # it failed, not stopped: say so in the exit status
        raise SystemExit(f"server.py: the HTTP front end exited with code {server.frontend.exitcode}")


if __name__ == "__main__":
    main()
