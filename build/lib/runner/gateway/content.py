"""Request content the provider would act on by itself: URLs it fetches, stored prompts,
background jobs.

A content block with a URL source makes the provider fetch that URL from its own
network: data leaves in the URL and content comes back, a road out that the sandbox
boundary cannot see. So, like hosted tools (see tools.py), the gateway refuses them
unless the policy says otherwise (`provider.url_sources`). Covered, in every place a
block can sit (messages, system, tool results, function-call outputs, prompt variables):
- Anthropic `image` / `document` (and any block) whose `source` is `{"type": "url"}`;
- OpenAI Chat `image_url` parts, Responses `input_image.image_url` and
  `computer_screenshot.image_url`: anything but a `data:` URL;
- `file_url` anywhere (Responses `input_file`, Chat `file` parts).
It fails closed: the whole body is walked, not only the fields known today, so a field
name from a newer API version that reuses these shapes is caught too.

Two Responses parameters are refused unless allowed: `prompt` (a stored prompt is
configured on the provider's side and can carry tools and files the gateway never
sees; `provider.stored_prompts`) and `background: true` (the answer is fetched later,
without usage in the reply, so the token budget could not see it; `provider.background`).

The same walk measures what is base64 media (images, PDFs, audio), which the input-token
estimate must not count as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Keys whose string value is media data (base64, or a data: URL), not text.
_MEDIA_DATA_KEYS = frozenset({"data", "file_data", "image_url", "url"})


@dataclass(frozen=True)
class ContentRefusal:
    reason: str  # "url_source" | "stored_prompt" | "background"
    where: str  # a JSON path to the offending value, clipped
    detail: str


@dataclass
class ContentScan:
    refusal: ContentRefusal | None = None
    media_bytes: int = 0  # bytes of base64 / data: media anywhere in the body
    media_items: int = 0


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _is_data_url(value: str) -> bool:
    return value.lstrip()[:5].lower() == "data:"


def _path(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return _clip(out, 160)


def scan(kind: str, body: dict[str, Any], *, url_sources: bool = False,
         stored_prompts: bool = False, background: bool = False) -> ContentScan:
    """One pass over the request body: the first refusal, and the media it carries.

    Iterative (a stack, no recursion): the body's nesting is the agent's choice."""
    result = ContentScan()
    if kind == "responses" and not stored_prompts and body.get("prompt") is not None:
        result.refusal = ContentRefusal(
            "stored_prompt", "prompt",
            "a stored prompt (Responses `prompt`) is configured on the provider's side and "
            "can carry tools and files the gateway cannot check; not allowed by the "
            "policy's provider.stored_prompts")
        return result
    if kind == "responses" and not background and body.get("background") is True:
        result.refusal = ContentRefusal(
            "background", "background",
            "a background response (`background: true`) is fetched later, without its "
            "token usage in this reply; not allowed by the policy's provider.background")
        return result
    stack: list[tuple[Any, list[str | int]]] = [(body, [])]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            refusal = None if url_sources else _url_refusal(node, path)
            if refusal is not None:
                result.refusal = refusal
                return result
            _count_media(node, result)
            for k, v in node.items():
                if isinstance(v, dict | list):
                    stack.append((v, [*path, k]))
        elif isinstance(node, list):
            images = path and path[-1] == "images"  # Ollama: a list of base64 strings
            for i, v in enumerate(node):
                if isinstance(v, dict | list):
                    stack.append((v, [*path, i]))
                elif images and isinstance(v, str):
                    result.media_bytes += len(v)
                    result.media_items += 1
    return result


def _url_refusal(node: dict[str, Any], path: list[str | int]) -> ContentRefusal | None:
    source = node.get("source")
    if isinstance(source, dict) and source.get("type") == "url":
        url = source.get("url")
        return _refusal([*path, "source"], url, f"a content block ({node.get('type')!r}) "
                        "with a URL source")
    image_url = node.get("image_url")
    if isinstance(image_url, dict):
        url = image_url.get("url")
        if isinstance(url, str) and not _is_data_url(url):
            return _refusal([*path, "image_url", "url"], url, "an image_url part")
    elif isinstance(image_url, str) and image_url and not _is_data_url(image_url):
        return _refusal([*path, "image_url"], image_url,
                        f"a content part ({node.get('type')!r}) with an image_url")
    file_url = node.get("file_url")
    if isinstance(file_url, str) and file_url:
        return _refusal([*path, "file_url"], file_url, "a file part with a file_url")
    return None


def _refusal(path: list[str | int], url: Any, what: str) -> ContentRefusal:
    shown = _clip(url, 80) if isinstance(url, str) else "?"
    return ContentRefusal(
        "url_source", _path(path),
        f"{what} ({shown!r}) would make the provider fetch it from its own network; "
        "not allowed by the policy's provider.url_sources")


def _count_media(node: dict[str, Any], result: ContentScan) -> None:
    """Base64 payloads: Anthropic `source.data`, data: URLs, `file_data`, audio `data`."""
    for k in _MEDIA_DATA_KEYS:
        v = node.get(k)
        if isinstance(v, dict) and k == "image_url":
            v = v.get("url")
        if not isinstance(v, str) or len(v) < 256:
            continue
        if k in ("image_url", "url") and not _is_data_url(v):
            continue
        if k == "data" and node.get("type") != "base64" and "format" not in node:
            continue  # a `data` field of something else: base64 sources and audio say so
        result.media_bytes += len(v)
        result.media_items += 1
