"""A small command-line client, for people who would rather not write curl.

    python -m app.client models                                        # the served models and their defaults
    python -m app.client generate --class dress -n 16 -o out/          # 16 PNGs in out/
    python -m app.client generate --class dress --model fashion-student -o out/   # the distilled student
    python -m app.client generate --class 3 -n 16 --grid -o out/       # one PNG grid
    python -m app.client stream --class "ankle boot" -n 4 -o out/ --previews
    python -m app.client generate --class dress -n 4 --rerank clip --candidates 16 -o out/   # best 4 of 16
    python -m app.client score out/*.png --class dress                  # CLIP similarity to the class prompt
    python -m app.client score a.png b.png --text "a red dress" --text "a boot"
    python -m app.client job --class dress -n 6000 --format idx -o out/dresses.tar   # a job; run again to resume
    python -m app.client job --counts 600,600,600,600,600,600,600,600,600,600 --seed 1 -o out/ds.npz

The server is ``--url`` (default: $FASHION_URL or http://127.0.0.1:8000); the API key is
``--api-key`` or $FASHION_API_KEY. Exit status: 0 on success, 1 when the server refused or
failed (its error message is printed), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


def _body(args: argparse.Namespace) -> dict[str, Any]:
    cls: int | str = int(args.cls) if re.fullmatch(r"\d+", args.cls) else args.cls
    body: dict[str, Any] = {"class": cls, "n": args.n}
    for key in ("model", "steps", "sampler", "guidance", "seed"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if getattr(args, "preview_every", None) is not None:
        body["preview_every"] = args.preview_every
    if args.rerank:
        body["rerank"] = {"by": args.rerank, "candidates": args.candidates} if args.candidates else args.rerank
    elif args.candidates:
        print("--candidates needs --rerank clip or --rerank classifier", file=sys.stderr)
        raise SystemExit(2)
    return body


def _headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def _error_text(response: httpx.Response) -> str:
    try:
        err = response.json()["error"]
        return f"HTTP {response.status_code} {err.get('code')}: {err.get('message')}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def save_images(result: dict[str, Any], out: Path) -> list[Path]:
    """Write each image of a /generate (or stream ``done``) body as <class>_<index>_seed<seed>.png."""
    out.mkdir(parents=True, exist_ok=True)
    name = _slug(result["params"]["class_name"])
    paths = []
    for image in result["images"]:
        path = out / f"{name}_{image['index']:03d}_seed{image['seed']}.png"
        path.write_bytes(base64.b64decode(image["png"]))
        paths.append(path)
    return paths


def generate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    headers = _headers(args)
    if args.grid:
        headers["Accept"] = "image/png"
    with httpx.Client(base_url=args.url, timeout=args.timeout) as client:
        response = client.post("/generate", json=_body(args), headers=headers)
    if response.status_code != 200:
        print(_error_text(response), file=sys.stderr)
        return 1
    if args.grid:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"grid_seed{response.headers.get('x-seed', 'random')}.png"
        path.write_bytes(response.content)
        print(f"wrote {path} (seeds {response.headers.get('x-seeds')})")
        return 0
    result = response.json()
    paths = save_images(result, out)
    t = result["timings"]
    print(
        f"wrote {len(paths)} images to {out} ({result['params']['class_name']}, {result['params']['sampler']} "
        f"{result['params']['steps']} steps, seed {result['params']['seed']}; {t['total_ms']:.0f} ms, "
        f"shared the device with up to {t['batch_jobs'] - 1} other requests)"
    )
    _print_rerank(result)
    return 0


def _print_rerank(result: dict[str, Any]) -> None:
    rerank = result.get("rerank")
    if rerank:
        kept = ", ".join(f"seed {img['seed']}: {img['score']:.4f}" for img in result["images"])
        print(f"kept the best {len(result['images'])} of {rerank['candidates']} by {rerank['by']} ({kept})")


def stream(args: argparse.Namespace) -> int:
    from httpx_sse import connect_sse  # only this command needs it

    out = Path(args.out)
    previews = out / "previews"
    with (
        httpx.Client(base_url=args.url, timeout=args.timeout) as client,
        connect_sse(client, "POST", "/generate/stream", json=_body(args), headers=_headers(args)) as source,
    ):
        if source.response.status_code != 200:
            source.response.read()
            print(_error_text(source.response), file=sys.stderr)
            return 1
        for event in source.iter_sse():
            data = json.loads(event.data)
            if event.event == "start":
                print(f"started job {data['job']} ({data['queue_depth']} queued)")
            elif event.event == "step":
                print(f"step {data['index'] + 1}/{data['total']} t={data['t']}", flush=True)
                if args.previews and data.get("x0_png"):
                    previews.mkdir(parents=True, exist_ok=True)
                    for key in ("x0", "xt"):
                        (previews / f"step{data['index']:04d}_{key}.png").write_bytes(
                            base64.b64decode(data[f"{key}_png"])
                        )
            elif event.event == "done":
                paths = save_images(data, out)
                print(f"wrote {len(paths)} images to {out}")
                _print_rerank(data)
                return 0
            elif event.event == "error":
                err = data["error"]
                print(f"error {err.get('code')}: {err.get('message')}", file=sys.stderr)
                return 1
    print("the stream ended without a done event", file=sys.stderr)
    return 1


def models(args: argparse.Namespace) -> int:
    """GET /models: one line per model, the default first."""
    with httpx.Client(base_url=args.url, timeout=args.timeout) as client:
        response = client.get("/models", headers=_headers(args))
    if response.status_code != 200:
        print(_error_text(response), file=sys.stderr)
        return 1
    for m in response.json()["data"]:
        role = f"{m['kind']} of {m['parent']}" if m.get("parent") else m["kind"]
        default = ", the default" if m["default"] else ""
        print(
            f"{m['id']} ({role}{default}; {m['parameters']} parameters, {m['precision']}): "
            f"{m['sampler']} {m['steps']} steps, guidance {m['guidance']}"
        )
    return 0


def score(args: argparse.Namespace) -> int:
    """POST the files to /clip/score as multipart/form-data; print one row per file."""
    if (args.cls is None) == (not args.text):
        print("give either --class or one or more --text", file=sys.stderr)
        return 2
    data: dict[str, Any] = {"class": args.cls} if args.cls is not None else {"texts": args.text}
    files = [("files", (Path(f).name, Path(f).read_bytes(), "application/octet-stream")) for f in args.files]
    with httpx.Client(base_url=args.url, timeout=args.timeout) as client:
        response = client.post("/clip/score", files=files, data=data, headers=_headers(args))
    if response.status_code != 200:
        print(_error_text(response), file=sys.stderr)
        return 1
    result = response.json()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"CLIP {result['model']}; cosine similarity (CLIPScore) per text:")
    for i, text in enumerate(result["texts"]):
        print(f"  [{i}] {text}")
    width = max(len(Path(f).name) for f in args.files)
    for name, sims, scores in zip(args.files, result["similarity"], result["clip_score"], strict=True):
        cells = "  ".join(f"[{i}] {c:+.4f} ({s:5.2f})" for i, (c, s) in enumerate(zip(sims, scores, strict=True)))
        print(f"{Path(name).name:<{width}}  {cells}")
    return 0


# --- jobs: POST /jobs, follow it, download the result (docs/api.md, Jobs) -------------------------------

RETRY_STATUSES = {429, 502, 503, 504}  # the server is busy, restarting or behind a proxy that lost it
FINISHED = ("succeeded", "failed", "cancelled")


def _job_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"format": args.format}
    if args.counts:
        body["counts"] = [int(c) for c in args.counts.split(",")]
    elif args.cls is not None and args.n is not None:
        body["class"] = int(args.cls) if re.fullmatch(r"\d+", args.cls) else args.cls
        body["n"] = args.n
    else:
        print("give --counts, or --class and -n", file=sys.stderr)
        raise SystemExit(2)
    for key in ("model", "sampler", "steps", "guidance", "guidance_method", "seed", "webhook_url"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    return body


class Patient:
    """Requests that outlast a dropped connection or a restarting server: transport errors, 429/502/503/504
    and a job kept by another replica (409 job_on_other_replica, behind Ray Serve's proxy) are retried with
    backoff (the server's Retry-After when it gives one) until ``patience`` seconds have gone."""

    def __init__(self, client: httpx.Client, patience: float) -> None:
        self.client, self.patience = client, patience

    def _retryable(self, response: httpx.Response) -> bool:
        if response.status_code in RETRY_STATUSES:
            return True
        return response.status_code == 409 and "job_on_other_replica" in response.text

    def wait(self, deadline: float, delay: float, why: str) -> None:
        if time.monotonic() + delay > deadline:
            raise httpx.TransportError(f"gave up after {self.patience:.0f} s: {why}")
        time.sleep(delay)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        deadline, delay = time.monotonic() + self.patience, 0.25
        while True:
            try:
                response = self.client.request(method, url, **kwargs)
            except httpx.TransportError as err:
                self.wait(deadline, delay, f"{type(err).__name__}: {err}")
            else:
                if not self._retryable(response):
                    return response
                after = response.headers.get("retry-after", "")
                self.wait(deadline, float(after) if after.isdigit() else delay, _error_text(response))
            delay = min(delay * 2, 10.0)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def follow(http: Patient, job_id: str, poll: float) -> dict[str, Any]:
    """Poll the job's status with a progress bar until it has ended; its last status."""
    from tqdm import tqdm

    bar = None
    try:
        while True:
            response = http.request("GET", f"/jobs/{job_id}")
            if response.status_code != 200:
                raise RuntimeError(_error_text(response))
            status = response.json()
            if bar is None:
                bar = tqdm(total=status["images_total"], unit="img", desc=job_id)
            bar.update(status["images_done"] - bar.n)
            rate = status.get("images_per_second")
            bar.set_postfix_str(f"{status['state']}" + (f", {rate:.1f} img/s" if rate else ""))
            if status["state"] in FINISHED:
                return status
            time.sleep(poll)
    finally:
        if bar is not None:
            bar.close()


def download(http: Patient, result: dict[str, Any], out: Path) -> None:
    """The result into ``out``, through ``out.part``: a download that breaks, or a run that is stopped and
    started again, goes on from the bytes it has (Range, If-Range on the ETag); the file is checked against
    the status's sha256 before it takes its name."""
    if out.exists() and _sha256(out) == result["sha256"]:
        print(f"{out} is complete (sha256 {result['sha256'][:12]}...)")
        return
    part = out.with_name(out.name + ".part")
    deadline = time.monotonic() + http.patience
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have < result["bytes"]:
            headers = {"Range": f"bytes={have}-", "If-Range": f'"{result["sha256"]}"'} if have else {}
            if have:
                print(f"resuming the download at byte {have} of {result['bytes']}")
            try:
                with http.client.stream("GET", result["url"], headers=headers) as response:
                    if response.status_code not in (200, 206):
                        response.read()
                        if response.status_code == 416:  # what we have is not a prefix of it: start again
                            part.unlink()
                            continue
                        if http._retryable(response):
                            http.wait(deadline, 1.0, _error_text(response))
                            continue
                        raise RuntimeError(_error_text(response))
                    with open(part, "ab" if response.status_code == 206 else "wb") as f:
                        for block in response.iter_bytes(1 << 16):
                            f.write(block)
            except httpx.TransportError as err:
                http.wait(deadline, 1.0, f"{type(err).__name__}: {err}")
                continue
        if _sha256(part) == result["sha256"]:
            part.replace(out)
            print(f"wrote {out} ({result['bytes']} bytes, sha256 {result['sha256'][:12]}..., checked)")
            return
        part.unlink()  # a prefix of another file (the job was made again?): download it whole
        http.wait(deadline, 1.0, "the downloaded file's sha256 does not match the job's")


def job(args: argparse.Namespace) -> int:
    """Submit a job (or follow ``--id``), show its progress, download and check its result."""
    with httpx.Client(base_url=args.url, timeout=args.timeout, headers=_headers(args)) as client:
        http = Patient(client, args.patience)
        job_id = args.id
        if job_id is None:
            body = _job_body(args)
            # The same command (body and output file) makes the same key: run it again to resume, never twice.
            key = (
                args.key
                or "cli-"
                + hashlib.sha256(
                    json.dumps([body, str(Path(args.out).resolve())], sort_keys=True).encode()
                ).hexdigest()[:32]
            )
            response = http.request("POST", "/jobs", json=body, headers={"Idempotency-Key": key})
            if response.status_code not in (200, 202):
                print(_error_text(response), file=sys.stderr)
                return 1
            job_id = response.json()["id"]
            print(f"job {job_id} ({'created' if response.status_code == 202 else 'already there'}; key {key})")
        status = follow(http, job_id, args.poll)
        if status["state"] == "failed":
            print(f"job {job_id} failed: {status['error']['code']}: {status['error']['message']}", file=sys.stderr)
            return 1
        result = status.get("result")
        if result is None:
            print(f"job {job_id} was cancelled before it made an image", file=sys.stderr)
            return 1
        out = Path(args.out)
        if out.is_dir() or args.out.endswith("/"):
            out = out / result["file"]
        out.parent.mkdir(parents=True, exist_ok=True)
        download(http, result, out)
        if result["partial"]:
            print(f"job {job_id} was cancelled: the file holds its first {result['images']} images", file=sys.stderr)
            return 1
    return 0


def job_arguments(s: argparse.ArgumentParser) -> None:
    s.set_defaults(fn=job)
    s.add_argument("-o", "--out", required=True, help="the result file (or a directory for the server's file name)")
    s.add_argument("--id", help="follow and download this job instead of submitting one")
    s.add_argument("--counts", help="images per class, 10 numbers separated by commas")
    s.add_argument("--class", dest="cls", help="with -n: one class, index 0-9 or a name")
    s.add_argument("-n", type=int, help="with --class: how many images")
    s.add_argument("--model")
    s.add_argument("--sampler")
    s.add_argument("--steps", type=int)
    s.add_argument("--guidance", type=float)
    s.add_argument("--guidance-method", choices=["classifier-free", "autoguidance"])
    s.add_argument("--seed", type=int, help="image i from seed + i (default: the server picks one)")
    s.add_argument("--format", default="npz", help="npz, idx or parquet (default npz)")
    s.add_argument("--webhook-url", help="the server tells this URL when the job ends")
    s.add_argument("--key", help="the Idempotency-Key (default: derived from the request and --out)")
    s.add_argument("--poll", type=float, default=1.0, help="seconds between status polls")
    s.add_argument("--patience", type=float, default=600.0, help="seconds to keep retrying a lost or restarting server")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.client", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--url", default=os.environ.get("FASHION_URL", DEFAULT_URL), help="server base URL")
    p.add_argument("--api-key", default=os.environ.get("FASHION_API_KEY"), help="API key, if the server has one")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn in (("generate", generate), ("stream", stream)):
        s = sub.add_parser(name, help=f"{name} images of one class")
        s.set_defaults(fn=fn)
        s.add_argument("--class", dest="cls", required=True, help="index 0-9 or a name (dress, 'ankle boot', ...)")
        s.add_argument("--model", help="a model of `models` (default: the server's first)")
        s.add_argument("-n", type=int, default=16, help="how many images")
        s.add_argument("-o", "--out", required=True, help="directory for the PNGs")
        s.add_argument("--steps", type=int)
        # No choices here: the server knows its samplers, and its 422 names them (one list, model.samplers).
        s.add_argument("--sampler", help="default: the model's")
        s.add_argument("--guidance", type=float)
        s.add_argument("--seed", type=int)
        s.add_argument("--rerank", choices=["clip", "classifier"], help="sample more candidates, keep the best n")
        s.add_argument("--candidates", type=int, help="candidates to sample with --rerank (default: 4 n)")
        if name == "generate":
            s.add_argument("--grid", action="store_true", help="ask for one PNG grid instead of n files")
        else:
            s.add_argument("--preview-every", type=int, help="previews every k steps")
            s.add_argument("--previews", action="store_true", help="also save the preview PNGs under OUT/previews")
    s = sub.add_parser("models", help="the served models and their sampling defaults")
    s.set_defaults(fn=models)
    s = sub.add_parser("score", help="CLIP similarity of image files with a class's prompts or with texts")
    s.set_defaults(fn=score)
    s.add_argument("files", nargs="+", help="image files (PNG, JPEG, ...)")
    s.add_argument("--class", dest="cls", help="index 0-9 or a name: score against the class's prompts")
    s.add_argument("--text", action="append", help="a prompt to score against (repeatable)")
    s.add_argument("--json", action="store_true", help="print the server's JSON answer")
    job_arguments(sub.add_parser("job", help="a dataset job: submit, follow, download (resumes when run again)"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.fn(args)
    except httpx.HTTPError as err:
        print(f"cannot reach {args.url}: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        print(str(err), file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
