"""A small attnserve client: `python -m server.client "prompt"` streams the answer to the terminal.

In your own code:

    from server.client import AttnserveClient
    with AttnserveClient("localhost:50051") as client:
        print(client.generate("The capital of France is", max_new_tokens=16).text)
        for chunk in client.stream(messages=[("user", "Hi!")]):
            print(chunk.text, end="", flush=True)

`python -m server.client inspect "prompt" --png out.png [--layer L --head H] [--html out.html]`
draws what each attention head attends to (InspectAttention; docs/inspection.md).
`python -m server.client embed "text" ["text" ...]` prints each embedding's size and norm and, for
several texts, their cosine similarities (`--json`: the vectors); `python -m server.client classify
digit.png [more.png ...]` prints each image's most probable labels. In code:

        client.embed(["a sentence", "another"]).embeddings[0].values
        client.classify([Path("digit.png").read_bytes()], top_k=3).results[0].labels

UNAVAILABLE (a draining server, a replica restarting behind a load balancer)
is retried by gRPC itself with exponential backoff, through the service config
below: 5 attempts, at most 1.5 s of backoff between them in all. A server not up
yet fails a call at once unless the client waits for it (`wait_for_ready=True`,
`--wait-for-ready`), and then only until the call's deadline. Every call
carries its deadline (`timeout`), retries and waiting included.

A server with TLS takes `ca_file` (the CA that signed its certificate; the
system's roots when omitted and `tls=True`), mutual TLS also `cert_file` and
`key_file`, and one with API keys `api_key` (or ATTNSERVE_API_KEY), sent as
`authorization: Bearer KEY` with every call.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import grpc

from attnserve.v1 import generation_pb2 as pb
from attnserve.v1 import generation_pb2_grpc as pb_grpc

SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "attnserve.v1.Generation"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})


def set_prompt(request, prompt: Optional[str], messages: Optional[Sequence[tuple[str, str]]],
               prompt_token_ids: Optional[Sequence[int]]) -> None:
    """Fill a request's `input` oneof (GenerateRequest, InspectAttentionRequest): chat messages, token ids or text."""
    if messages is not None:
        request.messages.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages]))
    elif prompt_token_ids is not None:
        request.prompt_token_ids.CopyFrom(pb.TokenIds(ids=list(prompt_token_ids)))
    else:
        request.prompt = prompt or ""


def build_request(prompt: Optional[str] = None, messages: Optional[Sequence[tuple[str, str]]] = None,
                  max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0,
                  top_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
                  seed: Optional[int] = None, stop: Sequence[str] = (), logprobs: int = 0,
                  request_id: str = "", prompt_token_ids: Optional[Sequence[int]] = None,
                  ignore_eos: bool = False) -> pb.GenerateRequest:
    request = pb.GenerateRequest(max_new_tokens=max_new_tokens, stop=list(stop), logprobs=logprobs,
                                 request_id=request_id, ignore_eos=ignore_eos)
    set_prompt(request, prompt, messages, prompt_token_ids)
    request.sampling.temperature = temperature
    request.sampling.top_k = top_k
    if top_p is not None:
        request.sampling.top_p = top_p
    if repetition_penalty is not None:
        request.sampling.repetition_penalty = repetition_penalty
    if seed is not None:
        request.sampling.seed = seed
    return request


def channel_credentials(ca_file: Optional[str] = None, cert_file: Optional[str] = None,
                        key_file: Optional[str] = None) -> grpc.ChannelCredentials:
    """TLS credentials: trust `ca_file` (or the system's roots), and present a client certificate if given."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both cert_file and key_file")

    def read(path):
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


class AttnserveClient:
    def __init__(self, target: str = "localhost:50051", timeout: Optional[float] = None,
                 options: Sequence[tuple] = (), wait_for_ready: bool = False, tls: bool = False,
                 ca_file: Optional[str] = None, cert_file: Optional[str] = None, key_file: Optional[str] = None,
                 api_key: Optional[str] = None):
        self.timeout = timeout  # seconds per call; None = no deadline
        self.wait_for_ready = wait_for_ready  # wait (until the deadline) for a server that is not up, not fail
        api_key = api_key if api_key is not None else os.environ.get("ATTNSERVE_API_KEY")
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        options = [("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG), *options]
        if tls or ca_file or cert_file:
            self.channel = grpc.secure_channel(target, channel_credentials(ca_file, cert_file, key_file), options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def _call_options(self, kwargs: dict) -> dict:
        return {"timeout": kwargs.pop("timeout", self.timeout),
                "wait_for_ready": kwargs.pop("wait_for_ready", self.wait_for_ready),
                "metadata": self.metadata}

    def generate(self, prompt: Optional[str] = None, **kwargs) -> pb.GenerateResponse:
        options = self._call_options(kwargs)
        return self.stub.Generate(build_request(prompt, **kwargs), **options)

    def stream(self, prompt: Optional[str] = None, **kwargs) -> Iterator[pb.GenerateStreamResponse]:
        options = self._call_options(kwargs)
        return self.stub.GenerateStream(build_request(prompt, **kwargs), **options)

    def model_info(self, name: str = "") -> pb.ModelInfo:
        """A served model's limits; name: one of served_models, empty = the decoder (or the only model)."""
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(name=name), **self._call_options({}))

    def embed(self, texts: Sequence[str], model: str = "", truncate: bool = False, **kwargs) -> pb.EmbedResponse:
        """One embedding per text, from `model` (empty = the only encoder served)."""
        request = pb.EmbedRequest(model=model, texts=list(texts), truncate=truncate)
        return self.stub.Embed(request, **self._call_options(kwargs))

    def classify(self, images: Sequence, model: str = "", top_k: int = 0, **kwargs) -> pb.ClassifyResponse:
        """Label probabilities per image: PNG or JPEG bytes, or pb.Image (raw_image() makes one of pixels)."""
        images = [i if isinstance(i, pb.Image) else pb.Image(encoded=bytes(i)) for i in images]
        request = pb.ClassifyRequest(model=model, top_k=top_k, images=images)
        return self.stub.Classify(request, **self._call_options(kwargs))

    def inspect_attention(self, prompt: Optional[str] = None, messages: Optional[Sequence[tuple[str, str]]] = None,
                          prompt_token_ids: Optional[Sequence[int]] = None, layers: Sequence[int] = (),
                          heads: Sequence[int] = (), generated_tokens: int = 0,
                          **kwargs) -> pb.InspectAttentionResponse:
        """Each head's attention probabilities (read them with `attention_pictures`). Answers can be tens of MB:
        make the client with options=[("grpc.max_receive_message_length", ...)] (the CLI does)."""
        request = pb.InspectAttentionRequest(layers=list(layers), heads=list(heads), generated_tokens=generated_tokens)
        set_prompt(request, prompt, messages, prompt_token_ids)
        return self.stub.InspectAttention(request, **self._call_options(kwargs))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def raw_image(pixels) -> pb.Image:
    """A uint8 array [H, W] or [H, W, C] (C = 1 or 3) as an Image of raw pixels, sent without encoding."""
    import numpy as np

    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    height, width, channels = pixels.shape
    return pb.Image(raw=pb.RawImage(data=pixels.tobytes(), height=height, width=width, channels=channels))


def attention_pictures(response: pb.InspectAttentionResponse):
    """(token labels, [attention_render.HeadPicture]) of an InspectAttention answer."""
    import numpy as np

    from server.attention_render import HeadPicture, label

    T = len(response.token_ids)
    heads = [HeadPicture(h.layer, h.head, np.frombuffer(h.probabilities, dtype="<f4").reshape(T, T),
                         np.asarray(h.entropy, dtype=np.float32)) for h in response.attention]
    return [label(t) for t in response.token_texts], heads


INSPECT_MAX_RECEIVE_BYTES = 512 * 1024 * 1024  # above the largest answer a server's default limits allow (64 MB)


def inspect_main(argv) -> int:
    """`python -m server.client inspect "prompt" --png out.png`: attention pictures and a per-head summary."""
    from server import attention_render

    parser = argparse.ArgumentParser(prog="python -m server.client inspect",
                                     description="Show what each attention head of the served model attends to.")
    parser.add_argument("prompt", help="the prompt, or with --chat the user's message")
    parser.add_argument("--target", default="localhost:50051", help="server address [localhost:50051]")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    parser.add_argument("--layer", type=int, action="append", default=[], help="a layer to show (repeatable; default all)")
    parser.add_argument("--head", type=int, action="append", default=[], help="a head to show (repeatable; default all)")
    parser.add_argument("--generated-tokens", type=int, default=0, help="append this many greedy tokens first [0]")
    parser.add_argument("--png", type=Path, help="write a grid of heatmaps (layers x heads; one head: large)")
    parser.add_argument("--html", type=Path, help="write a self-contained page: hover a token to see its attention")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds [300]")
    parser.add_argument("--ca-file", help="PEM CA that signed the server's certificate (TLS)")
    parser.add_argument("--api-key", help="API key [env ATTNSERVE_API_KEY]")
    args = parser.parse_args(argv)
    try:
        with AttnserveClient(args.target, timeout=args.timeout, ca_file=args.ca_file, api_key=args.api_key,
                             options=[("grpc.max_receive_message_length", INSPECT_MAX_RECEIVE_BYTES)]) as client:
            response = client.inspect_attention(
                None if args.chat else args.prompt, messages=[("user", args.prompt)] if args.chat else None,
                layers=args.layer, heads=args.head, generated_tokens=args.generated_tokens)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    labels, heads = attention_pictures(response)
    print(f"{len(labels)} tokens ({response.prompt_tokens} prompt + {response.generated_tokens} generated): "
          + " ".join(labels))
    print(attention_render.summary_text(heads))
    text = "".join(response.token_texts).replace("\n", " ")
    title = f"{len(labels)} tokens: " + (text if len(text) <= 90 else text[:89] + "\u2026")
    if args.png:
        rows, cols = attention_render.render_png(args.png, labels, heads, title=title)
        print(f"wrote {args.png} ({rows} layers x {cols} heads)")
    if args.html:
        attention_render.render_html(args.html, labels, heads, title=title)
        print(f"wrote {args.html}")
    return 0


def add_connection_arguments(parser: argparse.ArgumentParser, timeout: float = 120.0) -> None:
    parser.add_argument("--target", default="localhost:50051", help="server address [localhost:50051]")
    parser.add_argument("--timeout", type=float, default=timeout, help=f"deadline in seconds [{timeout:g}]")
    parser.add_argument("--tls", action="store_true", help="speak TLS, trusting the system's CAs (implied by --ca-file)")
    parser.add_argument("--ca-file", help="PEM CA that signed the server's certificate")
    parser.add_argument("--cert-file", help="PEM client certificate, for a server with mutual TLS")
    parser.add_argument("--key-file", help="PEM key of --cert-file")
    parser.add_argument("--api-key", help="API key, sent as `authorization: Bearer KEY` [env ATTNSERVE_API_KEY]")


def connect(args) -> AttnserveClient:
    return AttnserveClient(args.target, timeout=args.timeout, tls=args.tls, ca_file=args.ca_file,
                           cert_file=args.cert_file, key_file=args.key_file, api_key=args.api_key)


def embed_main(argv) -> int:
    """`python -m server.client embed "text" ...`: sizes, norms and cosine similarities of the embeddings."""
    import numpy as np

    parser = argparse.ArgumentParser(prog="python -m server.client embed", description="Embed texts with an encoder.")
    parser.add_argument("texts", nargs="+", help="the texts to embed")
    parser.add_argument("--model", default="", help="the encoder's name [the only encoder served]")
    parser.add_argument("--truncate", action="store_true", help="cut texts longer than the model reads; else refused")
    parser.add_argument("--json", action="store_true", help="print the vectors as JSON instead")
    add_connection_arguments(parser)
    args = parser.parse_args(argv)
    try:
        with connect(args) as client:
            response = client.embed(args.texts, model=args.model, truncate=args.truncate)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    vectors = np.asarray([list(e.values) for e in response.embeddings], dtype=np.float32)  # [N, D]
    if args.json:
        print(json.dumps({"model": response.model, "tokens": [e.tokens for e in response.embeddings],
                          "embeddings": vectors.tolist()}))
        return 0
    norms = np.linalg.norm(vectors, axis=1)  # [N]
    print(f"{response.model}: {len(vectors)} embeddings of {vectors.shape[1]} dims, {response.prompt_tokens} tokens")
    for i, (text, embedding, norm) in enumerate(zip(args.texts, response.embeddings, norms)):
        shown = text if len(text) <= 60 else text[:59] + "\u2026"
        print(f"[{i}] {embedding.tokens:4d} tokens, norm {norm:.4f}  {shown!r}")
    if len(vectors) > 1:
        cosine = (vectors @ vectors.T) / np.maximum(np.outer(norms, norms), 1e-12)  # [N, N]
        print("cosine similarity:")
        print("     " + "".join(f"{j:>8d}" for j in range(len(vectors))))
        for i, row in enumerate(cosine):
            print(f"[{i:2d}] " + "".join(f"{value:8.4f}" for value in row))
    return 0


def classify_main(argv) -> int:
    """`python -m server.client classify digit.png ...`: each image's most probable labels."""
    parser = argparse.ArgumentParser(prog="python -m server.client classify",
                                     description="Classify PNG or JPEG images with an image classifier.")
    parser.add_argument("images", nargs="+", type=Path, help="PNG or JPEG files")
    parser.add_argument("--model", default="", help="the classifier's name [the only image classifier served]")
    parser.add_argument("--top-k", type=int, default=3, help="labels shown per image; 0 = all [3]")
    add_connection_arguments(parser)
    args = parser.parse_args(argv)
    try:
        images = [path.read_bytes() for path in args.images]
        with connect(args) as client:
            response = client.classify(images, model=args.model, top_k=args.top_k)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{response.model}:")
    for path, result in zip(args.images, response.results):
        print(f"{path}: " + ", ".join(f"{label.label} {label.probability:.3f}" for label in result.labels))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"inspect": inspect_main, "embed": embed_main, "classify": classify_main}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="python -m server.client", description="Stream an answer from attnserve "
                                     "(or `python -m server.client inspect --help`: attention pictures; `embed "
                                     "--help`: embeddings; `classify --help`: image labels).")
    parser.add_argument("prompt", help="the prompt, or with --chat the user's message")
    parser.add_argument("--target", default="localhost:50051", help="server address [localhost:50051]")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message, rendered with the model's chat template")
    parser.add_argument("--system", help="with --chat, a system message first")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0 = the server's default")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [0]")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds [120]")
    parser.add_argument("--wait-for-ready", action="store_true",
                        help="wait for a server that is not up yet (until the deadline) instead of failing at once")
    parser.add_argument("--tls", action="store_true", help="speak TLS, trusting the system's CAs (implied by --ca-file)")
    parser.add_argument("--ca-file", help="PEM CA that signed the server's certificate")
    parser.add_argument("--cert-file", help="PEM client certificate, for a server with mutual TLS")
    parser.add_argument("--key-file", help="PEM key of --cert-file")
    parser.add_argument("--api-key", help="API key, sent as `authorization: Bearer KEY` [env ATTNSERVE_API_KEY]")
    args = parser.parse_args(argv)

    messages = None
    if args.chat:
        messages = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
    try:
        with AttnserveClient(args.target, timeout=args.timeout, wait_for_ready=args.wait_for_ready, tls=args.tls,
                             ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
                             api_key=args.api_key) as client:
            last = None
            for last in client.stream(
                None if args.chat else args.prompt, messages=messages, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
            ):
                sys.stdout.write(last.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            if last is not None:
                reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
                print(f"[{reason}; {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} generated tokens]",
                      file=sys.stderr)
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # an unreadable certificate or key file
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
