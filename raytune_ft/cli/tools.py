"""``rtf generate|merge|eval|plot|runs``: the after-training tools (:mod:`raytune_ft.tools`). Import-light:
each command imports its tool when it runs. UserErrors propagate to the main CLI, which prints them and
exits 2.
"""

from __future__ import annotations

import json

import typer

from raytune_ft import rundir as rd
from raytune_ft.cli.common import EndpointOpt, Typer

COMMANDS = ("generate", "merge", "eval", "plot", "runs", "push", "score")
TrustOpt = typer.Option(False, "--trust-remote-code", help="Run the model's own Python code (custom "
                        "architectures). Never taken from a run's stored spec.")


def _source(source: str, trust: bool):
    from raytune_ft.tools.source import resolve_source

    src = resolve_source(source)
    src.trust_remote_code = trust
    return src


def generate_cmd(
    source: str = typer.Argument(..., metavar="SOURCE", help="Job spec, run dir, checkpoint, model/adapter dir, or s3:// URI."),
    prompt: list[str] | None = typer.Option(None, "--prompt", "-p", metavar="TEXT", help="A prompt (repeatable)."),
    file: str | None = typer.Option(None, "--file", "-f", metavar="PROMPTS", help="Prompts: one per line, or .jsonl/.json."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, metavar="N", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0, metavar="T", help="0 = greedy decoding."),
    top_p: float = typer.Option(0.9, "--top-p", metavar="P", help="Nucleus sampling mass (with temperature > 0)."),
    compare_base: bool = typer.Option(False, "--compare-base", help="Also show the base model's completions."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Sampling seed (per prompt)."),
    data_format: str | None = typer.Option(None, "--format", metavar="alpaca|chat|text", help="Prompt format (default: the run's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    trust: bool = TrustOpt,
) -> None:
    """Generate text with a trained run, checkpoint or model dir (prompts formatted as in training)."""
    from raytune_ft.errors import UserError
    from raytune_ft.tools.generate import generate, read_prompts, render

    if prompt and file:
        raise UserError("give --prompt or --file, not both")
    prompts = list(prompt or []) or (read_prompts(file) if file else [])
    if not prompts:
        raise UserError("no prompts: pass --prompt TEXT (repeatable) or --file PROMPTS")
    info: dict = {}
    results = generate(
        _source(source, trust), prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        compare_base=compare_base, seed=seed, data_format=data_format, info=info,
    )
    if as_json:
        typer.echo(json.dumps({"info": info, "results": results}, indent=2, ensure_ascii=False))
    else:
        typer.echo(render(results, info))


def merge_cmd(
    source: str = typer.Argument(..., metavar="SOURCE", help="A LoRA/QLoRA run, checkpoint or adapter dir."),
    out_dir: str = typer.Argument(..., metavar="OUT_DIR", help="Where to write the merged model (local or s3://)."),
    dtype: str = typer.Option("float32", "--dtype", metavar="float32|bfloat16|float16", help="Dtype of the merged weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
    trust: bool = TrustOpt,
) -> None:
    """Merge a LoRA adapter into its base model (QLoRA: into the unquantized base) and save it."""
    from raytune_ft.tools.merge import merge

    result = merge(_source(source, trust), out_dir, dtype=dtype, overwrite=overwrite)
    for m in result["messages"]:
        typer.echo(m)


def eval_cmd(
    source: str = typer.Argument(..., metavar="SOURCE", help="Job spec, run dir, checkpoint, model/adapter dir, or s3:// URI."),
    data: str | None = typer.Option(None, "--data", metavar="FILE", help="Evaluate on this file instead of the run's eval data."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, metavar="N", help="Examples per forward pass."),
    include_base: bool = typer.Option(False, "--include-base", help="Also evaluate the base model."),
    out: str | None = typer.Option(None, "--out", metavar="PATH", help="Where to write eval_results.json (default: next to the model)."),
    data_format: str | None = typer.Option(None, "--format", metavar="alpaca|chat|text|scored|preference", help="Format of --data (default: the run's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    trust: bool = TrustOpt,
) -> None:
    """The objective's metrics on the run's eval data (or --data), as training scores them: token-weighted loss
    and perplexity (sft, dpo, orpo), mse/mae/r2 (regression), pairwise accuracy and margin (reward)."""
    from raytune_ft.tools.evaluate import evaluate, render

    result = evaluate(_source(source, trust), data, batch_size=batch_size, include_base=include_base, out=out, data_format=data_format)
    typer.echo(json.dumps(result, indent=2, default=str) if as_json else render(result))


def plot_cmd(
    source: str = typer.Argument(..., metavar="SOURCE", help=f"Job spec, run dir, sweep dir, {rd.METRICS}, or s3:// URI."),
    out: str = typer.Option("loss.png", "--out", "-o", metavar="PATH", help="PNG file to write."),
    log_scale: bool = typer.Option(False, "--log", help="Log scale for the loss axis."),
) -> None:
    """Plot train loss, eval loss and learning rate against step (a sweep: one line per trial)."""
    from raytune_ft.tools.plot import plot

    result = plot(source, out, log_scale=log_scale)
    points = ", ".join(f"{k}: {v}" for k, v in result["series"].items())
    typer.echo(f"wrote {result['out']} ({result['size'][0]}x{result['size'][1]}) points: {points}")
    if result["bad_lines"]:
        typer.echo(f"skipped {result['bad_lines']} unreadable line(s) of {rd.METRICS}")


def runs_cmd(
    storage: str = typer.Argument("./rtf_runs", metavar="STORAGE", help="A storage path: local dir or s3://bucket/prefix."),
    endpoint_url: str | None = EndpointOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the runs under a storage path: status, steps, losses, where the outputs are."""
    from raytune_ft.tools.runs import list_runs, render

    runs = list_runs(storage, endpoint_url=endpoint_url)
    typer.echo(json.dumps(runs, indent=2) if as_json else render(runs, storage))


def push_cmd(
    source: str = typer.Argument(..., metavar="RUN", help="Job spec, run dir or its final/ (local or s3://)."),
    repo_id: str = typer.Option(..., "--repo-id", metavar="ORG/NAME", help="The Hub model repo to create/update."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and print the model card; no network."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Upload a finished run's final/ (model or adapter, tokenizer, a model card, the loss plot) to the
    Hugging Face Hub, with the token in $HF_TOKEN."""
    from raytune_ft.tools.push import push, render

    result = push(source, repo_id, private=private, dry_run=dry_run)
    typer.echo(json.dumps(result, indent=2) if as_json else render(result))


def score_cmd(
    source: str = typer.Argument(..., metavar="SOURCE", help="A regression or reward run, checkpoint, final/ dir, or s3:// URI."),
    file: str = typer.Option(..., "--file", "-f", metavar="TEXTS", help="One text per line, or .jsonl of strings / "
                             "{text} | {messages} | {instruction, input, output} rows."),
    dtype: str | None = typer.Option(None, "--dtype", metavar="float32|bfloat16|float16",
                                     help="Weights dtype (default: float32 on CPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    trust: bool = TrustOpt,
) -> None:
    """Score texts with a regression head (in the labels' units) or a reward model (the scalar reward)."""
    from raytune_ft.tools.scoring import score

    results = score(_source(source, trust), file, dtype=dtype)
    if as_json:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    for r in results:
        text = r["text"] if isinstance(r["text"], str) else json.dumps(r["text"], ensure_ascii=False)
        typer.echo(f"{r['score']:.6g}\t{text[:100]!r}")


app = Typer()
app.command("generate")(generate_cmd)
app.command("merge")(merge_cmd)
app.command("eval")(eval_cmd)
app.command("plot")(plot_cmd)
app.command("runs")(runs_cmd)
app.command("push")(push_cmd)
app.command("score")(score_cmd)
