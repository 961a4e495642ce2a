"""The `k2quant` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import shlex
import signal
import sys
import threading
from pathlib import Path

import click

from .errors import K2QuantError

# long commands that keep finished work, and the flag that resumes them (None: the same command does)
RESUMABLE = {"convert": "--resume", "calibrate": "--resume", "diff": "--resume", "demo": None}


class _Group(click.Group):
    """Turns k2quant's input errors into one line on stderr and exit status 1, and SIGINT / SIGTERM
    into a clean stop: the long commands keep what they finished and print the command that resumes."""

    def parse_args(self, ctx, args):
        ctx.meta["k2quant.argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        argv = ctx.meta.get("k2quant.argv", [])
        caught = {}

        def on_term(signum, frame):
            caught["signal"] = signal.Signals(signum).name
            raise KeyboardInterrupt

        resumable = bool(argv) and argv[0] in RESUMABLE
        main_thread = threading.current_thread() is threading.main_thread()
        # SIGTERM only for the long commands (serve's uvicorn handles its own); restored afterwards
        previous = signal.getsignal(signal.SIGTERM) if resumable and main_thread else None
        if previous is not None:
            signal.signal(signal.SIGTERM, on_term)
        try:
            return super().invoke(ctx)
        except K2QuantError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            name = caught.get("signal", "SIGINT")
            if resumable:
                flag = RESUMABLE[argv[0]]
                again = argv if flag is None or flag in argv else [*argv, flag]
                click.echo(f"\ninterrupted ({name}): the work finished so far is kept; resume with:\n"
                           f"  {shlex.join(['k2quant', *again])}", err=True)  # fmt: skip
            else:
                click.echo(f"\ninterrupted ({name})", err=True)
            sys.exit(128 + getattr(signal, name))
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="k2quant")
def main() -> None:
    """k2quant: quantize, check and run Kimi K2 on hardware you own.

    \b
    Examples:
      k2quant demo                      # build mini-K2 and run the whole pipeline
      k2quant inspect ./Kimi-K2-Instruct
      k2quant inspect ./Kimi-K2-Instruct --json | jq .components
      k2quant verify ./k2-int4          # every output file against the manifest convert wrote
    """


@main.command()
@click.option(
    "--out",
    default="k2quant-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo model and outputs go (reused when already built).",
)
def demo(out: str) -> None:
    """Build a small K2 and run the k2quant pipeline on it.

    \b
    Example:
      k2quant demo --out /tmp/k2demo
    """
    from .demo import run

    run(out, echo=click.echo)


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--to",
    "target",
    type=click.Choice(["safetensors", "gguf"]),
    default="safetensors",
    show_default=True,
    help="Output format: compressed-tensors packed safetensors (vLLM, SGLang, transformers) or GGUF (llama.cpp).",
)
@click.option(
    "--preset",
    help="safetensors: k2-int4 (routed experts int4-g32, rest as in the source), int4-all, fp8. "
    "gguf: llama.cpp's f16, bf16, q8_0, q4_0, q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k, iq4_nl, iq4_xs, iq3_m, iq3_s, "
    "iq3_xs, iq3_xxs, iq2_m, iq2_s, iq2_xs, iq2_xxs, iq1_m, iq1_s (iq3_xs and below need --imatrix or --calib), or "
    "k2quant's MoE mixes k2-q4, k2-q3, k2-q2 (routed experts low, the rest high).",
)
@click.option("--recipe", "recipe_file", type=click.Path(exists=True, dir_okay=False), help="TOML recipe file.")
@click.option(
    "--override",
    "overrides",
    multiple=True,
    metavar="PATTERN=SCHEME",
    help="Regex on module names -> scheme (int4-g32|64|128[-asym|-r7], fp8-block, bf16, keep; for gguf a "
    "GGML type: q4_k, q6_k, q8_0, bf16, ..., matched against checkpoint and GGUF names); repeatable.",
)
@click.option(
    "--method",
    type=click.Choice(["mse", "rtn", "gptq"]),
    default="mse",
    show_default=True,
    help="int4: mse (error-minimizing clipping search), rtn (round-to-nearest) or gptq (Hessians from --calib DIR "
    "made by calibrate --hessian, else calibrated layer by layer here on --calib-data). gguf: mse (llama.cpp's "
    "two scale searches and a polish, the better per block) or rtn "
    "(llama.cpp's own procedure only); with --target-size / --bpw the default is rtn.",
)
@click.option("--act-order", is_flag=True, help="gptq: quantize columns by decreasing Hessian diagonal.")
@click.option(
    "--imatrix",
    type=click.Path(exists=True, dir_okay=False),
    help="Importance (imatrix GGUF from k2quant calibrate or llama.cpp) weighting the INT4 and k-quant searches.",
)
@click.option(
    "--calib",
    "calib_dir",
    type=click.Path(exists=True, file_okay=False),
    help="A k2quant calibrate output directory (its imatrix.gguf; its hessians.safetensors for --method gptq).",
)
@click.option(
    "--calib-data",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="gptq without --calib: calibration text (.txt, .jsonl), repeatable; default: the bundled set.",
)
@click.option("--calib-tokens", default=65536, show_default=True, help="gptq without --calib: calibration tokens.")
@click.option("--calib-ctx", default=512, show_default=True, help="gptq without --calib: tokens per sequence.")
@click.option(
    "--min-expert-tokens",
    default=0,
    show_default=True,
    help="gptq without --calib: top up experts routed fewer tokens (as calibrate does).",
)
@click.option(
    "--propagate",
    is_flag=True,
    help="gptq without --calib: calibrate each layer on the outputs of the layers before it as quantized "
    "(GPTQ's sequential order; runs every layer twice).",
)
@click.option(
    "--target-size",
    default=None,
    help="gguf: choose a type per tensor class and layer so the file is at most this size (240G = 240e9 bytes, "
    "240GiB = 240 x 2^30), by measured sensitivity (with --calib / --imatrix: weighted by it, and the i-quants "
    "that need one allowed); prints the mix and saves it as OUT/recipe.toml (a --recipe file).",
)
@click.option("--bpw", default=None, help="gguf: as --target-size, for this many bits per weight over the file.")
@click.option(
    "--sensitivity",
    type=click.Choice(["measured", "prior"]),
    default="measured",
    show_default=True,
    help="--target-size / --bpw: measured (each type's error on sampled weights) or prior (each type's error on "
    "a Gaussian matrix: by size and number of matrices alone).",
)
@click.option("--split-max-size", default=None, help="gguf: split into files of at most this size (e.g. 48G).")
@click.option("--name", "model_name", default=None, help="gguf: file stem and general.name (default SRC-PRESET).")
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes: shards in parallel (safetensors), tensor pieces in parallel (gguf).",
)
@click.option("--resume", is_flag=True, help="Finish an interrupted conversion in OUT.")
@click.option(
    "--transformers-config",
    is_flag=True,
    help="Write model_type deepseek_v3 so transformers loads OUT without remote code.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def convert(src, out, target, preset, recipe_file, overrides, method, act_order, imatrix, calib_dir, calib_data,
            calib_tokens, calib_ctx, min_expert_tokens, propagate, target_size, bpw, sensitivity, split_max_size,
            model_name, workers, resume, transformers_config, as_json):  # fmt: skip
    """Quantize SRC (a K2 / DeepSeek-V3 checkpoint) into OUT, streaming shard by shard.

    Source tensors already in the target form (FP8 block -> fp8-block, K2-Thinking
    INT4 g32 -> int4-g32) are repacked bit-exactly, never requantized. OUT must be
    empty or new; an interrupted run is finished with --resume.

    \b
    Examples:
      k2quant convert Kimi-K2-Instruct k2-int4 --to safetensors --preset k2-int4
      k2quant convert Kimi-K2-Instruct k2-mixed --preset k2-int4 \\
          --override 'layers\\.(1|2|3)\\.mlp\\.experts\\.=fp8-block' --workers 2
      k2quant convert Kimi-K2-Instruct k2-int4 --preset k2-int4 --resume
      k2quant convert Kimi-K2-Instruct k2-gptq --preset k2-int4 --method gptq --calib-data chat.jsonl \
          --calib-tokens 131072 --min-expert-tokens 128
      k2quant convert Kimi-K2-Instruct k2-gguf --to gguf --preset q4_k_m --calib calib --split-max-size 48G
      k2quant convert Kimi-K2-Instruct k2-gguf --to gguf --preset k2-q3 --override 'ffn_down_exps=q5_k'
      k2quant convert Kimi-K2-Instruct k2-240g --to gguf --target-size 240G --calib calib
      k2quant convert Kimi-K2-Instruct k2-2.4 --to gguf --bpw 2.4 --calib calib --split-max-size 48G
    """
    from .convert import convert as run_convert
    from .convert import format_summary
    from .recipe import build_recipe

    mixing = target_size is not None or bpw is not None
    if mixing and (target != "gguf" or preset or recipe_file or overrides or (target_size and bpw)):
        raise click.UsageError("--target-size or --bpw (one) chooses every tensor's GGUF type (--to gguf): leave "
                               "out --preset, --recipe and --override (edit the recipe.toml it writes)")  # fmt: skip
    recipe = None if mixing else build_recipe(preset, recipe_file, list(overrides), target=target)
    if calib_dir:
        from .calib.resume import check_finished

        check_finished(Path(calib_dir))
    if calib_dir and not imatrix:
        imatrix = str(Path(calib_dir) / "imatrix.gguf")
    hessians = str(Path(calib_dir) / "hessians.safetensors") if calib_dir and method == "gptq" else None
    if act_order and method != "gptq":
        raise click.UsageError("--act-order applies to --method gptq")
    if method == "gptq" and target == "gguf":
        raise click.UsageError("--method gptq writes INT4 (--to safetensors); GGUF k-quants use mse or rtn")
    if calib_data and (method != "gptq" or calib_dir):
        raise click.UsageError("--calib-data feeds --method gptq's own calibration; with --calib DIR, or for other "
                               "methods, calibrate first (k2quant calibrate --data ...)")  # fmt: skip
    if target == "gguf":
        from .convert_gguf import convert_gguf, parse_size

        extra, extra_summary = None, None
        if mixing:
            from . import open_checkpoint
            from .mix import format_mix, parse_bpw, plan_mix
            from .runner.console import parse_bytes

            size = parse_bytes(target_size, "--target-size") if target_size else None
            model_name = model_name or f"{Path(src).name}-{target_size or f'{bpw}bpw'}"
            mix = plan_mix(open_checkpoint(src), target_size=size, bpw=parse_bpw(bpw) if bpw else None,
                           imatrix=imatrix, sensitivity=sensitivity, split_max_size=parse_size(split_max_size),
                           stem=model_name, progress=not as_json)  # fmt: skip
            recipe = mix.recipe()
            if click.get_current_context().get_parameter_source("method") == click.core.ParameterSource.DEFAULT:
                method = "rtn"  # the plan measured llama.cpp's procedures; on the bench model mse lost (README)
            toml = f"# convert --to gguf --recipe recipe.toml --method {method} makes the same file\n" + mix.toml()
            extra, extra_summary = {"recipe.toml": toml}, {"mix": mix.summary()}
            if not as_json:
                click.echo(format_mix(mix))
        summary = convert_gguf(src, out, recipe, method=method, resume=resume, imatrix=imatrix,
                               split_max_size=split_max_size, name=model_name, progress=not as_json,
                               workers=workers, extra_files=extra, extra_summary=extra_summary)  # fmt: skip
        click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
        return
    summary = run_convert(src, out, recipe, method="gptq-act-order" if act_order else method, workers=workers,
                          resume=resume, imatrix=imatrix, hessians=hessians, transformers_config=transformers_config,
                          progress=not as_json, calib_data=list(calib_data) or None, calib_tokens=calib_tokens,
                          calib_ctx=calib_ctx, min_expert_tokens=min_expert_tokens,
                          propagate=propagate)  # fmt: skip
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--data",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Calibration text (.txt, .jsonl with text or chat messages); default: the bundled set.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where imatrix.gguf and hotness.json go.")
@click.option("--tokens", default=65536, show_default=True, help="Calibration tokens (sequences x ctx).")
@click.option("--ctx", default=512, show_default=True, help="Tokens per sequence.")
@click.option(
    "--min-expert-tokens",
    default=0,
    show_default=True,
    help="Top up experts routed fewer tokens with their best-scoring other tokens (statistics only).",
)
@click.option("--batch", default=8, show_default=True, help="Sequences per attention batch.")
@click.option(
    "--hessian",
    is_flag=True,
    help="Also write hessians.safetensors (X^T X per linear, in_features^2 floats each) for convert --method gptq.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Finish an interrupted calibration in OUT from its last finished layer (same inputs and options).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def calibrate(src, data, out, tokens, ctx, min_expert_tokens, batch, hessian, resume, as_json):
    """Learn importance (imatrix) and expert hotness from calibration text, layer-streamed.

    \b
    Writes imatrix.gguf (llama.cpp's format: in_sum2 and counts per tensor, 3-D for the
    experts), hotness.json (tokens routed, frequency, mean weight, top-ups per expert)
    and calibration.json (coverage per layer). Each finished layer's statistics and the
    hidden states after it are kept in OUT/.k2quant-calibrate (tokens x hidden x 4 bytes:
    3.8 GB for K2 at 131072 tokens), so an interrupted run resumes at the next layer.
    \b
    Examples:
      k2quant calibrate Kimi-K2-Instruct --out calib --tokens 131072 --min-expert-tokens 64
      k2quant calibrate Kimi-K2-Instruct --out calib --tokens 131072 --min-expert-tokens 64 --resume
      k2quant convert Kimi-K2-Instruct K2-int4 --preset k2-int4 --calib calib
      k2quant calibrate mini-k2 --out calib --hessian && k2quant convert mini-k2 out --preset int4-all \\
          --method gptq --calib calib
    """
    from .calibrate import calibrate as run_calibrate
    from .calibrate import format_summary

    s = run_calibrate(src, out, list(data) or None, tokens=tokens, ctx=ctx, min_expert_tokens=min_expert_tokens,
                      batch=batch, progress=not as_json, hessian=hessian, resume=resume)  # fmt: skip
    click.echo(json.dumps(s, indent=2) if as_json else format_summary(s))


@main.command()
@click.argument("ref", type=click.Path(exists=True))
@click.argument("cand", type=click.Path(exists=True))
@click.option(
    "--data",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Evaluation text (.txt, .jsonl) or token ids (.npy, .json); repeatable.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--ctx", default=512, show_default=True, help="Tokens per chunk (the second half is scored).")
@click.option("--chunks", type=int, default=None, help="Use at most this many chunks.")
@click.option("--batch", default=4, show_default=True, help="Chunks evaluated together.")
@click.option("--resume", is_flag=True, help="Finish an interrupted diff in OUT (it keeps each finished batch).")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json instead of the summary.")
def diff(ref, cand, data, out, ctx, chunks, batch, resume, as_json):
    """Accuracy diff of CAND against REF: KLD, perplexity, top-1, per layer, tensor and expert.

    Both models run layer-streamed, so neither has to fit in RAM. Statistics follow
    llama-perplexity --kl-divergence. Writes metrics.json, report.md and report.html. As each
    batch of chunks finishes its numbers are kept in OUT, so an interrupted run is finished with
    --resume (to the same metrics).

    \b
    Example:
      k2quant diff Kimi-K2-Instruct K2-int4 --data wiki.test.raw --out diff-int4 --ctx 512 --chunks 100
      k2quant diff Kimi-K2-Instruct K2-int4 --data wiki.test.raw --out diff-int4 --ctx 512 --chunks 100 --resume
    """
    from .report.diff import run_diff
    from .report.render import report_paths, terminal_summary

    m = run_diff(ref, cand, list(data), ctx=ctx, chunks=chunks, batch=batch, progress=not as_json, out=out,
                 resume=resume)  # fmt: skip
    paths = report_paths(out)
    if as_json:
        click.echo(paths["metrics"].read_text())
    else:
        click.echo(terminal_summary(m))
        click.echo(f"wrote {paths['metrics']}, {paths['markdown']}, {paths['html']}")


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(path: str, as_json: bool) -> None:
    """Architecture, parameters, bytes and bits per weight by component.

    \b
    Reads only headers: fast on a 1 TB checkpoint.
    Example:
      k2quant inspect ./Kimi-K2-Instruct --json
    """
    from .inspect import format_inspect, inspect_checkpoint

    info = inspect_checkpoint(path)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspect(info))


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--quick", is_flag=True, help="Compare sizes only (no data read: finds truncation, not a changed byte).")
@click.option(
    "--hashes",
    "hashes_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Check DIRECTORY (e.g. a downloaded source checkpoint) against published hashes instead: sha256sum "
    "output ('<sha256>  <name>') or a JSON object of file name -> sha256.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(directory: str, quick: bool, hashes_file: str | None, as_json: bool) -> None:
    """Check that DIRECTORY holds exactly what was written (or published).

    \b
    A k2quant output is checked against its k2quant_manifest.json (written last by
    convert: every file's size and sha256); each file missing, truncated or changed is
    named, files not in the manifest are noted. Exit status 1 when anything is wrong.
    \b
    Examples:
      k2quant verify k2-int4                 # re-read and hash every file
      k2quant verify k2-int4 --quick         # sizes only: seconds on a TB
      k2quant verify Kimi-K2-Instruct --hashes SHA256SUMS
      k2quant verify k2-gguf --json | jq .problems
    """
    from .manifest import format_verify, verify_dir, verify_hashes

    if hashes_file and quick:
        raise click.UsageError("--quick compares sizes, which a hashes file does not give")
    if hashes_file:
        r = verify_hashes(directory, hashes_file, progress=not as_json)
    else:
        r = verify_dir(directory, quick=quick, progress=not as_json)
    click.echo(json.dumps(r.to_dict(), indent=2) if as_json else format_verify(r))
    if not r.ok:
        sys.exit(1)


def runner_options(f):
    """The options that place and load a model for generation (`run` and `serve`)."""
    opts = [
        click.option("--device", type=click.Choice(["cuda", "cpu"]), help="Default: cuda when a GPU is present."),
        click.option(
            "--gpu-memory",
            help="VRAM the runner may use (20G = 20e9 bytes, 20GiB = 20 x 2^30); default: free VRAM - 1.5 GiB.",
        ),  # fmt: skip
        click.option(
            "--hotness",
            type=click.Path(exists=True, dir_okay=False),
            help="calibrate's hotness.json: hottest experts start on the GPU.",
        ),  # fmt: skip
        click.option("--static", is_flag=True, help="Keep the initial expert placement (no promotion / eviction)."),
        click.option("--threads", type=int, help="CPU threads for experts (default: all cores)."),
        click.option("--ctx", type=int, default=4096, show_default=True, help="Context length (KV cache tokens)."),
        click.option(
            "--mode",
            type=click.Choice(["fast", "exact"]),
            default="fast",
            show_default=True,
            help="fast: bf16 and packed kernels; exact: float32, weights decoded as open_model decodes them.",
        ),  # fmt: skip
        click.option(
            "--ram-bandwidth", help="RAM read bandwidth for the bound, e.g. 60G (bytes/s); default: measured once."
        ),  # fmt: skip
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _run_options(device, gpu_memory, hotness, static, threads, ctx, mode, ram_bandwidth, prefix_cache=1):
    from .runner.console import parse_bytes
    from .runner.placement import load_hotness
    from .runner.runner import RunOptions

    hot = load_hotness(hotness) if hotness else None
    return RunOptions(
        device=device,
        gpu_memory=parse_bytes(gpu_memory, "--gpu-memory") if gpu_memory else None,
        hotness=hot,
        threads=threads,
        ctx=ctx,
        mode=mode,
        dynamic=not static,
        ram_bandwidth=parse_bytes(ram_bandwidth, "--ram-bandwidth") if ram_bandwidth else None,
        prefix_cache=prefix_cache,
    )


@main.command()
@click.argument("model", type=click.Path(exists=True))
@click.option("-p", "--prompt", help="Prompt text (sent as one user turn in K2's chat format unless --raw).")
@click.option(
    "-f", "--file", "prompt_file", type=click.Path(exists=True, dir_okay=False), help="Read the prompt from a file."
)
@click.option("--chat", is_flag=True, help="Interactive multi-turn chat; history stays in the KV cache.")
@click.option("--system", help="System prompt (default: K2's own).")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat format.")
@click.option("--max-tokens", type=int, help="Most tokens to generate (default: until a stop or the context's end).")
@click.option(
    "--temperature", type=float, help="Sampling temperature; 0 is greedy (default: generation_config.json's, else 0.6)."
)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0: off.")
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, help="Sampling seed (the same seed gives the same text).")
@click.option("--stop", multiple=True, help="Stop at this string (repeatable).")
@runner_options
@click.option("--hide-thinking", is_flag=True, help="Do not show text between <think> and </think>.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token ids, statistics).")
def run(model, prompt, prompt_file, chat, system, raw, max_tokens, temperature, top_p, top_k, min_p, seed, stop,
        device, gpu_memory, hotness, static, threads, ctx, mode, ram_bandwidth, hide_thinking, as_json):  # fmt: skip
    """Generate with MODEL on this machine: GPU plus RAM, or the CPU alone.

    \b
    Attention, shared experts and the hottest routed experts go on the GPU, the other
    experts stay in RAM and run on CPU threads; experts this session routes often are
    promoted into spare VRAM between tokens. Text streams as it is made; statistics
    (speeds, placement, bytes per token against the bandwidth bound, RSS) follow.
    \b
    Examples:
      k2quant run K2-int4 --gpu-memory 20G --hotness calib/hotness.json --chat
      k2quant run K2-int4 --device cpu -p "Write a haiku about bandwidth" --max-tokens 64
      k2quant run K2-int4 -f prompt.txt --temperature 0 --json > out.json
    """
    from .runner.console import run_console
    from .runner.engine import Sampling
    from .runner.runner import Runner

    if sum(bool(x) for x in (prompt, prompt_file, chat)) != 1:
        raise click.UsageError("give exactly one of -p PROMPT, -f FILE or --chat")
    if prompt_file:
        prompt = Path(prompt_file).read_text(encoding="utf-8")
    opts = _run_options(device, gpu_memory, hotness, static, threads, ctx, mode, ram_bandwidth)
    runner = Runner(model, opts, progress=not as_json)
    try:
        temp = runner.default_temperature if temperature is None else temperature
        sampling = Sampling(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, max_tokens=max_tokens)
        sampling.check()
        run_console(runner, prompt, chat, system, raw, sampling, tuple(stop), hide_thinking, as_json)
    finally:
        runner.close()


@main.command()
@click.argument("model", type=click.Path(exists=True))
@runner_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port (0: a free one, printed).")
@click.option("--api-key", envvar="K2QUANT_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' (prefer the environment variable: "
              "it is not in the process list).")  # fmt: skip
@click.option("--model-name", help="The model id clients send (default: the model directory's name).")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests that may wait behind the running one; more get 503 with Retry-After.")  # fmt: skip
@click.option("--max-body", default="4MiB", show_default=True, help="Largest request body (larger: 413).")
@click.option("--prefix-cache", type=int, default=4, show_default=True,
              help="KV caches of this many recent conversations kept for prefix reuse (each of --ctx).")  # fmt: skip
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)  # fmt: skip
def serve(model, device, gpu_memory, hotness, static, threads, ctx, mode, ram_bandwidth, host, port, api_key,
          model_name, max_queue, max_body, prefix_cache, log_level):  # fmt: skip
    """Serve MODEL over an OpenAI-compatible HTTP API, with K2's tool calls.

    \b
    POST /v1/chat/completions (streaming or not; tools, tool_choice, reasoning_content),
    POST /v1/completions, GET /v1/models, GET /health. Requests run one at a time in
    arrival order on the runner (`k2quant run`'s placement and kernels); each reuses the
    KV cache of the recent conversation it extends. Binds 127.0.0.1 unless --host says
    otherwise.
    \b
    Examples:
      k2quant serve K2-int4 --gpu-memory 20G --hotness calib/hotness.json --port 8000
      K2QUANT_API_KEY=secret k2quant serve K2-int4 --host 0.0.0.0
      curl http://127.0.0.1:8000/v1/models
    """
    import logging

    from .formats.chat import ChatTemplate
    from .runner.console import parse_bytes
    from .runner.runner import Runner
    from .runner.server import ServeOptions, bind, create_app, make_server

    if max_queue < 0:
        raise click.BadParameter("must be >= 0", param_hint="--max-queue")
    opts = _run_options(device, gpu_memory, hotness, static, threads, ctx, mode, ram_bandwidth, prefix_cache)
    path = Path(model)
    name = model_name or (path if path.is_dir() else path.parent).resolve().name
    sock = bind(host, port)  # before loading: a taken port fails at once
    runner = Runner(model, opts)
    try:
        if runner.tokenizer is None:
            raise K2QuantError(f"{model}: no tiktoken.model beside the model; k2quant serve needs K2's tokenizer")
        template = ChatTemplate.load(path if path.is_dir() else path.parent)
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        app = create_app(runner, template, ServeOptions(name, api_key or None, max_queue,
                                                        parse_bytes(max_body, "--max-body"), loopback))  # fmt: skip
        logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        h, p = sock.getsockname()[:2]
        slot = runner.kv_bytes / max(1, prefix_cache) / 2**20
        key = "API key required" if api_key else "no API key"
        click.echo(f"k2quant serve: {name} at http://{h}:{p}/v1 ({key}; context {ctx} tokens, prefix cache "
                   f"{prefix_cache} x {slot:.0f} MiB)", err=True)  # fmt: skip
        make_server(app, sock, log_level).run(sockets=[sock])
    finally:
        runner.close()
        sock.close()


@main.command("plan")
@click.argument("model")
@click.option("--ram", help="RAM to plan for: 256GiB = 256 x 2^30 bytes (a '256 GB' machine), 256G = 256e9; "
              "default: this machine's.")  # fmt: skip
@click.option("--vram", help="GPU memory: 24GiB for a 24 GB card; 0 plans for the CPU alone; default: this "
              "machine's GPU, else 0.")  # fmt: skip
@click.option("--ctx", type=int, default=32768, show_default=True, help="Context the KV cache must hold (tokens).")
@click.option("--ram-bandwidth", help="RAM read bandwidth, e.g. 200G (bytes/s); default: measured here with the "
              "runner's method.")  # fmt: skip
@click.option("--vram-bandwidth", help="GPU memory bandwidth, e.g. 1008G; default: measured on this machine's GPU, "
              "else an RTX 4090's 1008 GB/s, marked assumed.")  # fmt: skip
@click.option("--disk-bandwidth", help="Sequential read bandwidth of the disk the model lives on, e.g. 7G; default: "
              "measured here (a 512 MiB temporary file in MODEL's directory, else the current one).")  # fmt: skip
@click.option("--calib", "calib_dir", type=click.Path(exists=True, file_okay=False),
              help="A k2quant calibrate output: hotness.json places the hottest experts on the GPU and weights bytes "
              "per token; imatrix.gguf goes to the convert commands.")  # fmt: skip
@click.option("--target", type=click.Choice(["gguf", "runner"]), help="Plan one target (default: both).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole plan as JSON.")
def plan_cmd(model, ram, vram, ctx, ram_bandwidth, vram_bandwidth, disk_bandwidth, calib_dir, target, as_json):
    """Which K2 file fits this machine (or the one given), and how fast it will decode.

    \b
    MODEL: a checkpoint directory (only headers are read), a config.json alone, or a
    known name: kimi-k2-instruct, kimi-k2-base, kimi-k2-thinking (their public configs
    ship with k2quant). For llama.cpp (GGUF mixes) and for k2quant's runner (INT4 with
    its GPU placement): file size, RAM and VRAM at run time with the KV cache at --ctx,
    decode tokens/s predicted from the bandwidth model, the best recipe that fits, and
    the commands. When no GGUF fits in RAM: running one from a memory-mapped NVMe file.
    \b
    Examples:
      k2quant plan kimi-k2-instruct --ram 256GiB --vram 24GiB
      k2quant plan ./Kimi-K2-Thinking --ram 512GiB --vram 32GiB --target runner --ctx 65536 --json
      k2quant plan ./Kimi-K2-Instruct/config.json --vram 0 --ram-bandwidth 230G --disk-bandwidth 7G
      k2quant plan kimi-k2-instruct --ram 768GiB --vram 24GiB --calib calib
    """
    from .plan import format_plan, measure_machine, parse_size, resolve_model
    from .plan import plan as make_plan

    src = resolve_model(model)
    size = lambda v, opt: parse_size(v, opt) if v is not None else None  # noqa: E731
    machine = measure_machine(ram=size(ram, "--ram"), vram=size(vram, "--vram"),
                              ram_bandwidth=size(ram_bandwidth, "--ram-bandwidth"),
                              vram_bandwidth=size(vram_bandwidth, "--vram-bandwidth"),
                              disk_bandwidth=size(disk_bandwidth, "--disk-bandwidth"),
                              disk_dir=src.directory)  # fmt: skip
    p = make_plan(src, machine, ctx, (target,) if target else ("gguf", "runner"), calib_dir)
    click.echo(json.dumps(p.to_dict(), indent=2) if as_json else format_plan(p))


if __name__ == "__main__":  # pragma: no cover
    main()
