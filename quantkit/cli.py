"""The ``quantkit`` command line: parse options, call the library, render the result with rich.

Mistakes a user can fix (``QuantkitError``) print one line and exit with status 2; anything else
is a bug and shows its traceback only with ``--debug`` (or ``QUANTKIT_DEBUG=1``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from quantkit import __version__
from quantkit.errors import QuantkitError

app = typer.Typer(
    name="quantkit",
    help="Make language models smaller and faster, and prove it: quantize, evaluate, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
_state = {"debug": os.environ.get("QUANTKIT_DEBUG", "") not in ("", "0")}

ModelArg = Annotated[Optional[str], typer.Argument(
    help="Model folder, hub id, or bundled name (quantkit-target, quantkit-draft). Default: the bundled target.",
    show_default=False)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"quantkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    if debug:
        _state["debug"] = True


@app.command()
def quantize(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the quantized checkpoint to.")] = ...,
    scheme: Annotated[str, typer.Option(help="Weight scheme: w8a16, w4a16, w3a16, w2a16.")] = "w4a16",
    group_size: Annotated[int, typer.Option(help="Input channels per scale: 32, 64, 128, ..., or -1 per channel.")] = 128,
    symmetric: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric (no zero point) or asymmetric.")] = True,
    method: Annotated[str, typer.Option(help="Algorithm: rtn, gptq or awq.")] = "rtn",
    fmt: Annotated[str, typer.Option("--format", help="Checkpoint layout: gptq, awq or compressed-tensors.")] = "gptq",
    ignore: Annotated[Optional[list[str]], typer.Option(
        help="Layers to keep in 16-bit (name, suffix or re:<regex>); repeatable. Default: lm_head.")] = None,
    act_order: Annotated[Optional[bool], typer.Option(
        "--act-order/--no-act-order", help="GPTQ: quantize columns by decreasing activation energy (desc_act).")] = None,
    damp_percent: Annotated[Optional[float], typer.Option(help="GPTQ: Hessian dampening, a fraction of its mean diagonal.")] = None,
    dataset: Annotated[str, typer.Option(
        help="Calibration text (gptq, awq): wikipedia, wikitext2, a local .txt/.jsonl/.parquet file or datasets folder.")] = "wikipedia",
    num_samples: Annotated[int, typer.Option(help="Calibration samples.")] = 128,
    calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration sample.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for drawing calibration samples.")] = 0,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe (see recipes/); replaces the options above.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: Annotated[str, typer.Option(help="Device for the working layer: cpu, cuda, cuda:1, ...")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="Calibration samples per forward pass (more: faster on small models, more accelerator memory).")] = 4,
    offload_activations: Annotated[bool, typer.Option(
        help="Keep calibration activations in CPU memory (for models whose activations do not fit the GPU).")] = False,
    low_host_memory: Annotated[Optional[bool], typer.Option(
        "--low-host-memory/--no-low-host-memory",
        help="Read each decoder layer from the safetensors files when it is quantized instead of loading the whole "
             "model (default: wherever it applies: a local float Llama-family checkpoint, a recipe that does not prune).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Quantize a model as a recipe says and write a checkpoint that vLLM and transformers load."""
    from quantkit.recipe import load_recipe, weight_quant_recipe

    if recipe is not None:
        plan = load_recipe(recipe)
    else:
        options = {k: v for k, v in (("act_order", act_order), ("damp_percent", damp_percent)) if v is not None}
        calibration = {"dataset": dataset, "num_samples": num_samples, "seq_len": calib_seq_len, "seed": seed}
        plan = weight_quant_recipe(scheme, group_size=group_size, symmetric=symmetric, method=method,
                                   ignore=tuple(ignore) if ignore else ("lm_head",), fmt=fmt, options=options,
                                   calibration=calibration)
    result = _run_compress(model, plan, output, overwrite, device, batch_size, offload_activations, low_host_memory,
                           show_progress=not as_json and _launch_rank() == 0)
    if result.rank != 0:
        return  # under torchrun rank 0 wrote the checkpoint and reports it
    layers = result.pipeline.layers
    summary = {
        "model": result.model_path, "output": str(result.output), "recipe": plan.to_dict(),
        "quantized_layers": len(result.pipeline.quantized), "skipped_layers": result.pipeline.skipped,
        "seconds": round(result.seconds, 3), "calibration_tokens": result.calibration_tokens,
        "max_relative_weight_error": max((r.max_error for r in layers), default=0.0),
        "layer_output_errors": [r.output_error for r in layers] if plan.needs_calibration else None,
        "peak_device_bytes": result.pipeline.peak_device_bytes, "ranks": result.world_size,
    }
    if result.sparsity is not None:
        summary["sparsity"] = result.sparsity.to_dict()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    out = Console()
    if result.sparsity is not None:
        _render_pruned(plan, result, model, out)
        return
    out.print(f"[bold green]wrote[/] {result.output}  ({len(result.pipeline.quantized)} layers, {plan.summary}, "
              f"{plan.format} layout, {result.seconds:.1f}s)", soft_wrap=True)
    out.print(f"compare with: quantkit eval {result.output} --baseline {model or 'quantkit-target'}",
              soft_wrap=True)


def _render_pruned(plan, result, model, out: Console) -> None:
    from quantkit.sparsity.render import render_sparsity
    from quantkit.sparsity.step import SparsityStep

    step = next(s for s in plan.steps if isinstance(s, SparsityStep))
    render_sparsity(result.sparsity, out)
    out.print(f"[bold green]wrote[/] {result.output}  ({len(result.sparsity.linears)} linears pruned, {step.name}, "
              f"{plan.format} layout, {result.seconds:.1f}s)", soft_wrap=True)
    out.print(f"compare with: quantkit eval {result.output} --baseline {model or 'quantkit-target'}", soft_wrap=True)


def _run_compress(model, plan, output, overwrite, device, batch_size, offload_activations, low_host_memory,
                  show_progress: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from quantkit.compress import compress

    progress = Progress(TextColumn("[bold]quantizing[/]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
                        disable=not show_progress, transient=False)
    task = {}

    def on_start(num_layers: int) -> None:
        task["id"] = progress.add_task("layers", total=num_layers, detail="")

    def on_layer(report) -> None:
        detail = f"layer {report.index}: weight error {report.max_error:.4f}"
        if report.output_error is not None:
            detail += f", output error {report.output_error:.4f}"
        progress.update(task["id"], advance=1, detail=detail)

    with progress:
        return compress(model, plan, output, overwrite=overwrite, device=device, batch_size=batch_size,
                        offload_activations=offload_activations, low_host_memory=low_host_memory,
                        on_start=on_start, on_layer=on_layer)


@app.command("eval")
def evaluate(
    model: ModelArg = None,
    baseline: Annotated[Optional[str], typer.Option(help="A second model (e.g. the original) to compare with.")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option(
        help="Evaluation text: wikitext2, wikipedia-heldout, or a local .txt/.jsonl file; repeatable.")] = None,
    seq_len: Annotated[int, typer.Option(help="Window length in tokens.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows (quick checks).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    output_json: Annotated[Optional[Path], typer.Option("--output-json", help="Also write the JSON here.")] = None,
    latency: Annotated[bool, typer.Option(
        "--latency", help="Measure single-request latency on the runtime (TTFT, TPOT, end to end) instead of perplexity.")] = False,
    input_len: Annotated[int, typer.Option(help="--latency: prompt tokens (random ids).")] = 128,
    output_len: Annotated[int, typer.Option(help="--latency: output tokens per request.")] = 128,
    repetitions: Annotated[int, typer.Option(help="--latency: timed requests (median and p99 over them).")] = 10,
    async_scheduling: Annotated[Optional[bool], typer.Option(
        "--async-scheduling/--no-async-scheduling",
        help="--latency: launch each decode step before the previous step's tokens reach the host [default: on CUDA].",
        show_default=False)] = None,
) -> None:
    """Perplexity, parameter count and size of a model; beside a baseline, also the share of
    positions where both predict the same next token and the mean KL divergence between them.
    With --latency: time to first token, time per output token and end-to-end time of single requests."""
    if latency:
        return _eval_latency(model, baseline, input_len, output_len, repetitions, device, dtype, as_json, output_json,
                             async_scheduling)
    from quantkit.eval.evaluate import evaluate_model, evaluate_pair
    from quantkit.eval.report import render_eval_table, results_to_json

    datasets = dataset or ["wikitext2"]
    options = dict(datasets=datasets, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows,
                   device=device, dtype=dtype, progress=not as_json)
    if baseline is not None:
        result, base = evaluate_pair(model, baseline, **options)
    else:
        result, base = evaluate_model(model, **options), None
    payload = results_to_json([result], baseline=base)
    if output_json is not None:
        output_json.write_text(json.dumps(payload, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
    else:
        render_eval_table([result], baseline=base, console=Console())


def _eval_latency(model, baseline, input_len, output_len, repetitions, device, dtype, as_json, output_json,
                  async_scheduling=None) -> None:
    from quantkit.eval.bench_report import render_latency, to_json, write_json
    from quantkit.eval.latency import LatencyConfig, run_latency_pair

    config = LatencyConfig(input_len=input_len, output_len=output_len, repetitions=repetitions).check()
    payload = run_latency_pair(model, baseline, config, device=device, dtype=dtype,
                               async_scheduling=async_scheduling, progress=not as_json)
    if output_json is not None:
        write_json(payload, output_json)
    if as_json:
        typer.echo(to_json(payload), nl=False)
    else:
        render_latency(payload, payload["baseline"], payload["speedup"], console=Console())


class _BenchGroup(TyperGroup):
    """``quantkit bench [MODEL] ...`` runs the offline benchmark (the ``model`` subcommand);
    ``quantkit bench serve URL ...`` the load generator against a running server."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["model", *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(
    cls=_BenchGroup, add_completion=False, pretty_exceptions_enable=False,
    help="Benchmarks: 'quantkit bench [MODEL]' runs the runtime offline on a seeded workload; "
         "'quantkit bench serve URL' loads a running OpenAI-compatible server.")
app.add_typer(bench_app, name="bench")


@bench_app.command("model")
def bench(
    model: ModelArg = None,
    num_requests: Annotated[int, typer.Option(help="Requests in the workload.")] = 64,
    input_len_range: Annotated[str, typer.Option(help="Prompt lengths MIN,MAX in tokens (uniform).")] = "100,512",
    output_len_range: Annotated[str, typer.Option(help="Output lengths MIN,MAX in tokens (uniform).")] = "100,512",
    seed: Annotated[int, typer.Option(help="Seed of the workload's lengths, arrivals and prompts.")] = 0,
    text_file: Annotated[Optional[Path], typer.Option(help="Cut prompts from this text file's tokens instead of random ids.")] = None,
    request_rate: Annotated[float, typer.Option(help="Poisson arrivals in requests/s; inf: all at once.")] = float("inf"),
    max_concurrency: Annotated[Optional[int], typer.Option(help="Most requests in the engine at a time.")] = None,
    concurrency: Annotated[Optional[str], typer.Option(help="Sweep of max concurrency values, e.g. 1,4,16,64 (for --plot).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16.")] = "auto",
    kv_cache_tokens: Annotated[Optional[int], typer.Option(help="KV cache size in tokens (default: from free accelerator memory; 65536 on the CPU).")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option(help="Share of accelerator memory the engine may use.")] = 0.9,
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences per engine step.")] = 256,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Token budget of one engine step.")] = 2048,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also run the workload through transformers' generate (static batches).")] = False,
    baseline_batch_size: Annotated[int, typer.Option(help="--baseline: requests per static batch.")] = 8,
    baseline_requests: Annotated[Optional[int], typer.Option(help="--baseline: run only the first N requests (default: all).")] = None,
    draft: Annotated[Optional[str], typer.Option(help="Draft model for speculative decoding (if the engine supports it).")] = None,
    num_speculative_tokens: Annotated[Optional[int], typer.Option(help="--draft: tokens proposed per step.")] = None,
    async_scheduling: Annotated[Optional[bool], typer.Option(
        "--async-scheduling/--no-async-scheduling",
        help="Launch each decode step before the previous step's tokens reach the host [default: on CUDA].",
        show_default=False)] = None,
    json_path: Annotated[Optional[str], typer.Option("--json", help="Write the results as JSON to this file ('-': stdout).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of throughput against concurrency (needs matplotlib).")] = None,
) -> None:
    """Offline throughput of the runtime on a seeded workload: requests/s, tokens/s, TTFT, TPOT,
    end-to-end latency, peak memory, KV-cache use and the bandwidth limit; with --baseline, the
    same workload through transformers and the ratio, measured in the same run."""
    from quantkit.eval import bench_report
    from quantkit.eval.throughput import BenchConfig, EngineOptions, parse_concurrency, parse_len_range, run_bench

    config = BenchConfig(
        num_requests=num_requests, input_len_range=parse_len_range(input_len_range, "--input-len-range"),
        output_len_range=parse_len_range(output_len_range, "--output-len-range"), seed=seed, text_file=text_file,
        request_rate=request_rate, max_concurrency=max_concurrency,
        concurrency=None if concurrency is None else parse_concurrency(concurrency), baseline=baseline,
        baseline_batch_size=baseline_batch_size, baseline_requests=baseline_requests).check()
    if plot is not None:
        bench_report.check_plot_available()
    options = EngineOptions(device=device, dtype=dtype, kv_cache_tokens=kv_cache_tokens,
                            gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens, draft=draft,
                            num_speculative_tokens=num_speculative_tokens, async_scheduling=async_scheduling)
    payload = run_bench(model, config, options, progress=json_path != "-")
    if plot is not None:
        bench_report.plot_concurrency(payload, plot)
    if json_path == "-":
        typer.echo(bench_report.to_json(payload), nl=False)
        return
    if json_path is not None:
        bench_report.write_json(payload, json_path)
    bench_report.render_bench(payload, console=Console())


@bench_app.command("serve")
def bench_serve(
    url: Annotated[str, typer.Argument(help="The server, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine).")],
    model: Annotated[Optional[str], typer.Option(help="Served model name (default: the server's first).")] = None,
    num_requests: Annotated[int, typer.Option(help="Requests per request rate.")] = 64,
    input_len_range: Annotated[str, typer.Option(help="Prompt lengths MIN,MAX in tokens (uniform; random prompts).")] = "100,512",
    output_len_range: Annotated[str, typer.Option(help="Output lengths MIN,MAX in tokens (uniform).")] = "100,512",
    seed: Annotated[int, typer.Option(help="Seed of lengths, prompts and arrivals (the same workload as 'quantkit bench MODEL').")] = 0,
    prompts_file: Annotated[Optional[Path], typer.Option(help="Prompts from a file (.txt: one per line; .jsonl: a 'prompt' field) instead of random token ids.")] = None,
    request_rate: Annotated[str, typer.Option(help="Poisson arrivals in requests/s, or inf (all at once); a comma-separated list sweeps, e.g. 1,2,4,inf.")] = "inf",
    max_concurrency: Annotated[Optional[int], typer.Option(help="Most requests in flight at a time.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos/--no-ignore-eos", help="Generate exactly the drawn output length (comparable runs).")] = True,
    api_key: Annotated[Optional[str], typer.Option(envvar="QUANTKIT_API_KEY", help="Bearer token for a server started with --api-key.")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Random prompt ids below this (default: what /v1/models reports).")] = None,
    logprobs: Annotated[bool, typer.Option("--logprobs", help="Ask for token log-probabilities so tokens that decode to no text still count (random models).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds one request may take.")] = 600.0,
    json_path: Annotated[Optional[str], typer.Option("--json", help="Write the results as JSON to this file ('-': stdout).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of throughput and latency against the request rate.")] = None,
) -> None:
    """Load a running OpenAI-compatible server (vLLM's serving-benchmark metrics): requests/s,
    output tokens/s, TTFT, TPOT, inter-token and end-to-end latency (mean, median, p99)."""
    from quantkit.eval import bench_report, serve_report
    from quantkit.eval.serve_bench import ServeBenchConfig, parse_rates, run_serve_bench
    from quantkit.eval.throughput import parse_len_range

    config = ServeBenchConfig(
        url=url, model=model, num_requests=num_requests,
        input_len_range=parse_len_range(input_len_range, "--input-len-range"),
        output_len_range=parse_len_range(output_len_range, "--output-len-range"), seed=seed,
        prompts_file=prompts_file, request_rates=parse_rates(request_rate), max_concurrency=max_concurrency,
        ignore_eos=ignore_eos, api_key=api_key, timeout_s=timeout, vocab_size=vocab_size, logprobs=logprobs).check()
    if plot is not None:
        bench_report.check_plot_available()
    payload = run_serve_bench(config, progress=json_path != "-")
    if plot is not None:
        serve_report.plot_serve_bench(payload, plot)
    if json_path == "-":
        typer.echo(bench_report.to_json(payload), nl=False)
        return
    if json_path is not None:
        bench_report.write_json(payload, json_path)
    serve_report.render_serve_bench(payload, console=Console())


@app.command()
def serve(
    model: ModelArg = None,
    draft: Annotated[Optional[str], typer.Option(help="Draft model for speculative decoding (e.g. quantkit-draft).")] = None,
    num_speculative_tokens: Annotated[Optional[int], typer.Option(help="--draft: tokens proposed per step.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="QUANTKIT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 and tokenizer routes (or set QUANTKIT_API_KEY).")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="The name clients send as 'model' (default: MODEL as given).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16.")] = "auto",
    kv_cache_tokens: Annotated[Optional[int], typer.Option(help="KV cache size in tokens (default: from free accelerator memory; 65536 on the CPU).")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option(help="Share of accelerator memory the engine may use.")] = 0.9,
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences in the running batch.")] = 256,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Token budget of one engine step.")] = 2048,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait beyond the running batch; more get 429.")] = 512,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 beyond).")] = 1 << 20,
    max_prompt_tokens: Annotated[Optional[int], typer.Option(help="Longest prompt accepted (default: the context minus one).")] = None,
    max_n: Annotated[int, typer.Option(help="Most samples (n) per request.")] = 16,
    shutdown_timeout: Annotated[float, typer.Option(help="On SIGTERM, seconds in-flight requests may run before they are aborted.")] = 30.0,
    cpu_threads: Annotated[Optional[int], typer.Option(help="--device cpu: torch threads for the engine (default: all cores but one, kept for HTTP).")] = None,
    log_level: Annotated[str, typer.Option(help="critical, error, warning, info or debug.")] = "info",
    engine_process: Annotated[Optional[bool], typer.Option("--engine-process/--engine-thread", help="Run the engine in its own process (the HTTP work then never holds the GIL the engine loop needs), or on a thread of the server's. Default: a process on a GPU (H100: 9.5% HTTP overhead against 27% on a thread), a thread on the CPU (where a second busy process competes for the cores).")] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming) on
    quantkit's runtime, with /health, /metrics (Prometheus) and /v1/models."""
    from quantkit.server.launch import serve as run_server
    from quantkit.server.settings import ServerSettings

    if log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
        raise QuantkitError(f"--log-level '{log_level}' must be critical, error, warning, info or debug")
    settings = ServerSettings(served_names=[served_model_name or model or "quantkit-target"], api_key=api_key,
                              max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_n=max_n,
                              max_queue=max_queue, max_num_seqs=max_num_seqs)
    engine_options = {"device": device, "dtype": dtype, "kv_cache_tokens": kv_cache_tokens,
                      "gpu_memory_utilization": gpu_memory_utilization,
                      "max_num_batched_tokens": max_num_batched_tokens}
    if num_speculative_tokens is not None:
        if draft is None:
            raise QuantkitError("--num-speculative-tokens needs --draft")
        engine_options["num_speculative_tokens"] = num_speculative_tokens
    run_server(model, draft=draft, host=host, port=port, settings=settings, engine_options=engine_options,
               shutdown_timeout=shutdown_timeout, log_level=log_level.lower(), cpu_threads=cpu_threads,
               engine_process=engine_process, ready_message=lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True))


@app.command()
def distill(
    student: Annotated[str, typer.Option(help="The model to train: a pruned or float copy of the teacher, or a smaller model with its tokenizer.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the trained student to.")],
    teacher: Annotated[Optional[str], typer.Option(help="The model to imitate (default: the bundled target).")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML distillation recipe (recipes/distill.yaml); the options below override it.")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option(help="Training text: wikipedia, wikitext2, a local .txt/.jsonl/.parquet file or datasets folder; repeatable.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per training sequence.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per micro-batch.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop training after this long; without --max-steps the run sizes itself to it.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Softmax temperature of the KL loss.")] = None,
    kl_weight: Annotated[Optional[float], typer.Option(help="Weight of KL(teacher || student).")] = None,
    hidden_weight: Annotated[Optional[float], typer.Option(help="Weight of the hidden-state loss on matched layers.")] = None,
    lm_weight: Annotated[Optional[float], typer.Option(help="Weight of the plain language-modelling loss.")] = None,
    mixed_precision: Annotated[Optional[str], typer.Option(help="no, bf16 or fp16 (accelerate autocast).")] = None,
    qat: Annotated[Optional[str], typer.Option(help="Train quantization-aware with this weight scheme (w4a16, ...) and write a GPTQ checkpoint.")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Steps between resumable checkpoints.")] = None,
    eval_windows: Annotated[Optional[int], typer.Option(help="Perplexity windows of 512 tokens per text, before and after.")] = None,
    eval_dataset: Annotated[Optional[list[str]], typer.Option(help="Evaluation text (wikitext2, wikipedia-heldout, a local file); repeatable.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the training batches.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (accelerate places the models).")] = "cpu",
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --checkpoint-dir.")] = False,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Where checkpoints go (default: OUTPUT.distill next to the output).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Train a student to match a teacher's next-token distributions (KL at a temperature, plus
    optional hidden-state and language-modelling losses); a pruned student keeps its zeros.
    Prints the student's perplexity before and after beside the teacher's."""
    from dataclasses import replace

    from quantkit.distill.config import DistillConfig, load_distill_config, with_overrides
    from quantkit.distill.render import DistillProgress, render_report
    from quantkit.distill.trainer import distill as run_distill

    config = load_distill_config(recipe)[0] if recipe is not None else DistillConfig()
    config = with_overrides(config, dataset=dataset, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
                            max_steps=max_steps, max_minutes=max_minutes, lr=lr, temperature=temperature,
                            kl_weight=kl_weight, hidden_weight=hidden_weight, lm_weight=lm_weight,
                            mixed_precision=mixed_precision, qat_scheme=qat, save_every=save_every,
                            eval_windows=eval_windows, eval_datasets=eval_dataset, seed=seed)
    if max_minutes is not None and max_steps is None:
        config = replace(config, max_steps=None)  # the run sizes itself to the time budget
    with DistillProgress(console, enabled=not as_json) as progress:
        report = run_distill(teacher, student, output, config, device=device, overwrite=overwrite, resume=resume,
                             checkpoint_dir=checkpoint_dir, callback=progress.callback)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        render_report(report, Console())


def main() -> None:
    """Console-script entry point."""
    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except QuantkitError as error:
        _fail(error, f"error: {error}")
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, EOFError):
        console.print("aborted")
        sys.exit(1)
    except Exception as error:  # noqa: BLE001 - the last line of defence for bugs
        if _is_usage_error(error):  # click's exceptions (typer may ship its own copy of click)
            error.show()
            sys.exit(error.exit_code)
        _fail(error, f"internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
              code=1)


def _is_usage_error(error: Exception) -> bool:
    return any(cls.__name__ == "ClickException" for cls in type(error).__mro__)


def _quiet_libraries() -> None:
    """quantkit draws its own progress bars; the libraries' bars and warnings would interleave."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _launch_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _fail(error: BaseException, message: str, code: int = 2) -> None:
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        message = f"[rank {_launch_rank()}] {message}"  # the launcher ends the other ranks
    if _state["debug"]:
        console.print_exception()
    else:
        console.print(message, style="bold red", markup=False, highlight=False)
    sys.exit(code)


if __name__ == "__main__":
    main()
