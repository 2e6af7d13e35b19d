"""The ProGuard engines up to the GPU: request construction, output handling, P(unsafe), failures.

The server engine talks HTTP to a real local chat-completions server (tests/chat_server.py). The
in-process vLLM engine is exercised through its constructor seam with a recording ``LLM`` stand-in
that checks the exact arguments vLLM would receive.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guard.chat import IMAGE_PLACEHOLDER, p_unsafe_from_logprobs, render_qwen2_5_vl
from guard.engines import EngineKind, build_engine, build_streaming_engine
from guard.engines.hf import TransformersEngine
from guard.engines.server import ServerConfig, ServerEngine
from guard.engines.vllm import VllmConfig, VllmEngine
from guard.errors import EngineError
from guard.parser import format_output
from guard.prompts import PromptSet
from guard.samples import drawn_image
from guard.types import GuardEngine, ModerationItem
from schemas.events import Modality
from tests.chat_server import ChatServer, tokenize

P_CONFIDENT = math.exp(-0.05) / (math.exp(-0.05) + math.exp(-3.0))


def canned(body: dict[str, Any]) -> str:
    """ProGuard-format answers keyed on the post text (what a served ProGuard would return)."""
    user = body["messages"][1]["content"][-1]["text"]
    image_only = (
        "text-image" not in body["messages"][0]["content"]
        and "single image" in body["messages"][0]["content"]
    )
    if "cocaine" in user:
        return format_output(unsafe=True, category="C8S3", reasoning="drug sale", image_only=image_only)
    if "challenge" in user:
        return format_output(unsafe=True, category="Dangerous Viral Breath Challenge", reasoning="new trend")
    if "garbled" in user:
        return "<think>\nthe model was cut off"
    return format_output(unsafe=False, reasoning="benign", image_only=image_only)


@pytest.fixture
def server() -> Any:
    s = ChatServer(canned).start()
    yield s
    s.stop()


def test_server_engine_requests_follow_inference_py(server: ChatServer, prompts: PromptSet) -> None:
    eng = ServerEngine(prompts, ServerConfig(base_url=server.url, model="ProGuard-7B", max_concurrency=4))
    img = drawn_image(3)
    items = [
        ModerationItem("t", "Buy cocaine here"),
        ModerationItem("i", None, (img,)),
        ModerationItem("ti", "look at this", (img,)),
    ]
    verdicts = eng.moderate(items)
    eng.close()
    by_text = {r["messages"][1]["content"][-1]["text"]: r for r in server.requests}
    text_req = by_text[prompts.render(Modality.TEXT, "Buy cocaine here", 0).user]
    assert (
        text_req["model"] == "ProGuard-7B"
        and text_req["temperature"] == 0.0
        and text_req["max_tokens"] == 1024
    )
    assert text_req["messages"][0] == {"role": "system", "content": prompts.system(Modality.TEXT)}
    assert text_req["messages"][1]["content"] == [
        {"type": "text", "text": prompts.render(Modality.TEXT, "Buy cocaine here", 0).user}
    ]
    img_req = by_text[prompts.render(Modality.IMAGE, None, 1).user]
    assert img_req["messages"][0]["content"] == prompts.system(Modality.IMAGE)
    assert [p["type"] for p in img_req["messages"][1]["content"]] == ["image_url", "text"]
    combo = by_text[prompts.render(Modality.TEXT_IMAGE, "look at this", 1).user]
    assert combo["messages"][0]["content"] == prompts.system(Modality.TEXT_IMAGE)
    assert all(im.size == (320, 240) and im.mode == "RGB" for im in server.images)
    assert [(v.safe, v.subcategory) for v in verdicts] == [(False, "C8S3"), (True, None), (True, None)]
    assert verdicts[0].p_unsafe == pytest.approx(P_CONFIDENT)
    assert verdicts[1].p_unsafe == pytest.approx(1 - P_CONFIDENT)
    assert verdicts[0].reasoning == "drug sale"


def test_server_engine_novel_risk_and_parse_error(server: ChatServer, prompts: PromptSet) -> None:
    eng = ServerEngine(prompts, ServerConfig(base_url=server.url))
    novel, broken = eng.moderate(
        [ModerationItem("a", "try the blackout challenge"), ModerationItem("b", "garbled")]
    )
    eng.close()
    assert (
        novel.safe is False
        and novel.novel_risk == "Dangerous Viral Breath Challenge"
        and novel.category is None
    )
    assert (
        broken.parse_error
        and broken.raw_output == "<think>\nthe model was cut off"
        and broken.p_unsafe is None
    )


def test_server_engine_bounds_concurrency_and_retries(server: ChatServer, prompts: PromptSet) -> None:
    server.fail_first = 2
    eng = ServerEngine(prompts, ServerConfig(base_url=server.url, max_concurrency=3, backoff_base_s=0.01))
    out = eng.moderate([ModerationItem(str(i), f"post {i}") for i in range(24)])
    eng.close()
    assert len(out) == 24 and all(v.safe is True for v in out)
    assert server.max_in_flight <= 3 and len(server.requests) == 24


def test_server_engine_multi_image_posts_are_split_and_combined(
    server: ChatServer, prompts: PromptSet
) -> None:
    eng = ServerEngine(prompts, ServerConfig(base_url=server.url))
    (v,) = eng.moderate([ModerationItem("m", "cocaine for sale", (drawn_image(1), drawn_image(2)))])
    eng.close()
    assert len(server.requests) == 2  # ProGuard's prompt takes one image; vLLM would reject two
    assert v.safe is False and v.subcategory == "C8S3" and v.extra["images_judged"] == "2"


def test_server_engine_outage_is_an_engine_error(prompts: PromptSet) -> None:
    from infra.stack import free_port

    eng = ServerEngine(
        prompts,
        ServerConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", max_attempts=2, backoff_base_s=0.01),
    )
    with pytest.raises(EngineError, match="after 2 attempt"):
        eng.moderate([ModerationItem("x", "hello")])
    eng.close()


# ------------------------------------------------------------------------------------------ vLLM seam
@dataclass
class RecordingLLM:
    kwargs: dict[str, Any]
    respond: Any = None
    calls: list[tuple[list[dict[str, Any]], Any, bool]] = field(default_factory=list)
    fail: Exception | None = None

    def generate(
        self, prompts: list[dict[str, Any]], sampling_params: Any = None, use_tqdm: bool = True
    ) -> Any:
        self.calls.append((prompts, sampling_params, use_tqdm))
        if self.fail:
            raise self.fail
        outs = []
        for p in prompts:
            text = self.respond(p)
            toks = tokenize(text)
            ids = list(range(len(toks)))
            lps = []
            for i, t in enumerate(toks):
                pos = {i: SimpleNamespace(logprob=-0.05 if t in ("uns", "safe") else -0.01, decoded_token=t)}
                if t in ("uns", "safe"):
                    pos[10_000 + i] = SimpleNamespace(
                        logprob=-3.0, decoded_token="safe" if t == "uns" else "uns"
                    )
                lps.append(pos)
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=ids, logprobs=lps)]))
        return outs


def vllm_respond(p: dict[str, Any]) -> str:
    if "cocaine" in p["prompt"]:
        return format_output(unsafe=True, category="C8S3")
    image_only = "multi_modal_data" in p and "User: \n" in p["prompt"]
    return format_output(unsafe=False, image_only=image_only)


def make_vllm(prompts: PromptSet, **cfg: Any) -> tuple[VllmEngine, RecordingLLM, dict[str, Any]]:
    holder: dict[str, Any] = {}

    def llm_factory(**kw: Any) -> RecordingLLM:
        holder["llm"] = RecordingLLM(kw, vllm_respond)
        return holder["llm"]

    def sp_factory(**kw: Any) -> dict[str, Any]:
        holder["sp"] = kw
        return {"SamplingParams": kw}

    eng = VllmEngine(prompts, VllmConfig(model="/models/ProGuard-7B", **cfg), llm_factory, sp_factory)
    return eng, holder["llm"], holder["sp"]


def test_vllm_engine_arguments(prompts: PromptSet) -> None:
    eng, llm, sp = make_vllm(prompts)
    assert llm.kwargs == {
        "model": "/models/ProGuard-7B",
        "dtype": "bfloat16",
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.9,
        "max_num_seqs": 128,
        "tensor_parallel_size": 1,
        "limit_mm_per_prompt": {"image": 1},
        "mm_processor_kwargs": {"min_pixels": 3136, "max_pixels": 1003520},
        "enable_prefix_caching": True,
        "seed": 0,
    }
    assert sp == {"temperature": 0.0, "max_tokens": 1024, "logprobs": 5, "seed": 0}
    img = drawn_image(5)
    batch = [
        ModerationItem("t", "Buy cocaine here"),
        ModerationItem("i", None, (img,)),
        ModerationItem("ti", "nice garden", (img,)),
        ModerationItem("m", "two pics", (drawn_image(6), drawn_image(7))),
    ]
    verdicts = eng.moderate(batch)
    assert len(llm.calls) == 1, "one generate call per batch"
    reqs, passed_sp, tqdm = llm.calls[0]
    assert passed_sp == {"SamplingParams": sp} and tqdm is False
    assert len(reqs) == 5  # the two-image post became two single-image requests
    t = prompts.render(Modality.TEXT, "Buy cocaine here", 0)
    assert reqs[0] == {"prompt": render_qwen2_5_vl(t.system, t.user, 0)}
    i = prompts.render(Modality.IMAGE, None, 1)
    assert reqs[1]["prompt"] == render_qwen2_5_vl(i.system, i.user, 1)
    assert reqs[1]["prompt"].count(IMAGE_PLACEHOLDER) == 1 and reqs[1]["multi_modal_data"]["image"] is img
    ti = prompts.render(Modality.TEXT_IMAGE, "nice garden", 1)
    assert reqs[2]["prompt"] == (
        f"<|im_start|>system\n{ti.system}<|im_end|>\n<|im_start|>user\n{IMAGE_PLACEHOLDER}{ti.user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert [(v.safe, v.subcategory) for v in verdicts] == [
        (False, "C8S3"),
        (True, None),
        (True, None),
        (True, None),
    ]
    assert verdicts[0].p_unsafe == pytest.approx(P_CONFIDENT)
    assert verdicts[3].extra["images_judged"] == "2"


def test_vllm_engine_starts_from_the_checkpoint_sampling_defaults(prompts: PromptSet) -> None:
    """``LLM.generate`` with an explicit SamplingParams ignores generation_config (issue 15 item 3): the
    engine reads the defaults vLLM would apply (``ModelConfig.get_diff_sampling_param``) and overrides
    only temperature, max_tokens, logprobs and seed."""
    holder: dict[str, Any] = {}
    defaults = {"repetition_penalty": 1.05, "top_p": 0.001, "top_k": 1, "temperature": 0.1, "max_tokens": 99}

    def llm_factory(**kw: Any) -> RecordingLLM:
        llm = RecordingLLM(kw, vllm_respond)
        llm.llm_engine = SimpleNamespace(  # type: ignore[attr-defined]
            model_config=SimpleNamespace(get_diff_sampling_param=lambda: dict(defaults))
        )
        return llm

    def sp_factory(**kw: Any) -> dict[str, Any]:
        holder["sp"] = kw
        return kw

    VllmEngine(prompts, VllmConfig(model="/m", max_tokens=512), llm_factory, sp_factory)
    assert holder["sp"] == {
        "repetition_penalty": 1.05,
        "top_p": 0.001,
        "top_k": 1,
        "temperature": 0.0,
        "max_tokens": 512,
        "logprobs": 5,
        "seed": 0,
    }


def test_vllm_engine_failures_are_engine_errors(prompts: PromptSet) -> None:
    eng, llm, _ = make_vllm(prompts)
    llm.fail = RuntimeError("CUDA out of memory")
    with pytest.raises(EngineError, match="CUDA out of memory"):
        eng.moderate([ModerationItem("x", "hi")])
    llm.fail = None
    llm.respond = vllm_respond
    orig = llm.generate
    llm.generate = lambda prompts, **kw: orig(prompts, **kw)[:-1]  # type: ignore[method-assign]
    with pytest.raises(EngineError, match="outputs for"):
        eng.moderate([ModerationItem("x", "hi"), ModerationItem("y", "yo")])


def test_engine_selection_builds_each_backend(server: ChatServer) -> None:
    eng = build_engine(ServerConfig(base_url=server.url))
    assert isinstance(eng, ServerEngine) and isinstance(eng, GuardEngine)
    assert eng.policy_version.startswith("proguard-")
    eng.close()
    with pytest.raises(ModuleNotFoundError):  # vllm is the [gpu] extra, absent on CPU machines
        build_engine(EngineKind.VLLM)


def test_transformers_engine_uses_the_same_prompts(prompts: PromptSet) -> None:
    proc = SimpleNamespace(tokenizer=SimpleNamespace(padding_side="right"))
    eng = TransformersEngine(prompts, model=object(), processor=proc)
    assert proc.tokenizer.padding_side == "left"
    img = drawn_image(2)
    texts, images = eng.build_inputs([ModerationItem("a", "hello"), ModerationItem("b", "pic", (img,))])
    veng, _, _ = make_vllm(prompts)
    assert texts == [
        veng.build_request(ModerationItem("a", "hello"))["prompt"],
        veng.build_request(ModerationItem("b", "pic", (img,)))["prompt"],
    ]
    assert images == [img]


# ------------------------------------------------------------------------------------ P(unsafe)
def test_p_unsafe_reads_the_request_label() -> None:
    text = format_output(unsafe=True, category="C1S1", reasoning="Request: safe? no")
    toks = tokenize(text)
    tops = [{"uns": -0.2, "safe": -1.8} if t == "uns" else {t: 0.0} for t in toks]
    expected = math.exp(-0.2) / (math.exp(-0.2) + math.exp(-1.8))
    assert p_unsafe_from_logprobs(toks, tops) == pytest.approx(expected)  # the label in <think> is ignored
    assert p_unsafe_from_logprobs([], []) is None
    assert p_unsafe_from_logprobs(["<think>", "x"], [{}, {}]) is None


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["<answer>", "Request", ":", " ", "uns", "afe", "safe", "x", "\n"]),
            st.dictionaries(
                st.sampled_from(["uns", "safe", " unsafe", "x"]),
                st.floats(min_value=-50, max_value=0),
                max_size=3,
            ),
        ),
        max_size=30,
    )
)
def test_p_unsafe_is_total_and_a_probability(pairs: list[tuple[str, dict[str, float]]]) -> None:
    p = p_unsafe_from_logprobs([t for t, _ in pairs], [d for _, d in pairs])
    assert p is None or 0.0 <= p <= 1.0


def test_canned_answers_are_valid_json_roundtrip() -> None:
    assert json.loads(
        json.dumps(
            {"x": canned({"messages": [{"content": "single image"}, {"content": [{"text": "hello"}]}]})}
        )
    )


@pytest.mark.integration
def test_worker_with_server_engine_routes_novel_risks(
    server: ChatServer, kafka_settings: Any, services: Any
) -> None:
    from workers.demo.sample_feed import post
    from workers.kafka.topics import produce_all, read_topic
    from workers.wiring import build_worker

    posts = [
        post("n1", "a1", "try the blackout challenge tonight"),
        post("n2", "a2", "cocaine delivered"),
        post("n3", "a3", "hello friends"),
        post("n4", "a4", "garbled"),
    ]
    produce_all(kafka_settings.bootstrap_servers, kafka_settings.posts_topic, [(None, p) for p in posts])
    # the worker's own path: the streaming server engine (one request per post, out of order)
    eng = build_streaming_engine(ServerConfig(base_url=server.url))
    build_worker(kafka_settings, eng).run(until_drained=True)
    verdicts = {
        json.loads(v)["post_id"]: json.loads(v)
        for v in read_topic(kafka_settings.bootstrap_servers, kafka_settings.verdicts_topic)
    }
    novel = [
        json.loads(v) for v in read_topic(kafka_settings.bootstrap_servers, kafka_settings.novel_risk_topic)
    ]
    dlq = [json.loads(v) for v in read_topic(kafka_settings.bootstrap_servers, kafka_settings.dlq_topic)]
    assert set(verdicts) == {"n1", "n2", "n3"}
    assert verdicts["n1"]["novel_risk"] == "Dangerous Viral Breath Challenge"
    assert verdicts["n2"]["subcategory"] == "C8S3" and verdicts["n2"]["category_name"] == "Dangerous Goods"
    assert verdicts["n2"]["engine"] == "proguard-vllm-server"
    assert [n["post_id"] for n in novel] == ["n1"]
    assert [(d["post_id"], d["error_code"]) for d in dlq] == [("n4", "engine_output_unparseable")]
    assert "the model was cut off" in dlq[0]["message"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("outage_s", "dead_after_s"),
    [(3.0, 15.0), (2.5, 0.5)],
    ids=["503-burst-shorter-than-dead_after_s", "503-outage-longer-held-by-the-worker"],
)
def test_worker_rides_out_a_server_outage_without_dead_letters(
    kafka_settings: Any, services: Any, prompts: PromptSet, outage_s: float, dead_after_s: float
) -> None:
    """The server answers 503 to everything for a few seconds from the first request on, then recovers.
    Every post gets its verdict and none is dead-lettered: within dead_after_s each request keeps
    retrying; past it the engine is dead and the worker holds the posts and re-submits them. Before,
    each request gave up after 3 attempts (~1 s) and the worker dead-lettered it ``engine_failed``."""
    from guard.engines.server import AsyncServerEngine
    from workers.demo.sample_feed import post
    from workers.kafka.topics import produce_all, read_topic
    from workers.wiring import build_worker

    server = ChatServer(canned, outage_s=outage_s).start()
    try:
        posts = [post(f"o{i}", "a", f"post number {i}") for i in range(12)]
        produce_all(kafka_settings.bootstrap_servers, kafka_settings.posts_topic, [(None, p) for p in posts])
        eng = AsyncServerEngine(prompts, ServerConfig(base_url=server.url, dead_after_s=dead_after_s))
        s = kafka_settings.model_copy(update={"outage_backoff_s": 0.5, "cache_enabled": False})
        stats = build_worker(s, eng).run(until_drained=True)
    finally:
        server.stop()
    verdicts = [
        json.loads(v)["post_id"]
        for v in read_topic(kafka_settings.bootstrap_servers, kafka_settings.verdicts_topic)
    ]
    dlq = [json.loads(v) for v in read_topic(kafka_settings.bootstrap_servers, kafka_settings.dlq_topic)]
    assert [(d["post_id"], d["error_code"]) for d in dlq] == []
    assert sorted(verdicts) == sorted(f"o{i}" for i in range(12)) and stats.dead_letters == 0
    failed = len(server.headers) - len(server.requests)
    assert failed > 12, "the outage was hit (and ridden out)"
    print(
        f"\n{outage_s:g}s outage, dead_after_s {dead_after_s:g}: {failed} failed requests, 12 verdicts, 0 dlq"
    )
