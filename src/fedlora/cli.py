"""The `fedlora` command line: thin wrappers that parse, call the API and print."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from rich.console import Console
from rich.table import Table

from .core.offline import use_offline



def _results_table(results: dict, metric: str) -> Table:
    from .engines.results import results_table  # here: the module imports torch

    return results_table(results, metric)


def _metric(result) -> str:
    from .engines.results import headline_metric

    return headline_metric(result)


def cmd_run(args: argparse.Namespace) -> None:
    """`fedlora run`: run one experiment, or resume a stopped run, and print its results table."""
    from .core.config import as_config  # before the API: a config error is reported without importing torch
    from .core.errors import ConfigError

    if args.resume:
        # a run resumes exactly as it was configured: anything else given would be silently ignored
        rounds = [s for s in args.set or [] if s.startswith("federation.rounds=")]
        others = [s for s in args.set or [] if s not in rounds]
        ignored = [flag for flag, given in (("CONFIG", args.config), ("--set " + " ".join(others), others),
                                            ("--overwrite", args.overwrite)) if given]
        if ignored:
            raise ConfigError(f"--resume continues a run with its own saved config; drop {', '.join(ignored)} "
                              "(only --set federation.rounds=N can extend it; to change settings, start a new run)")
        from .api import resume_experiment

        n = rounds[-1].partition("=")[2] if rounds else None
        if n is not None and not n.isdigit():
            raise ConfigError(f"--set federation.rounds={n}: give a whole number of rounds")
        result = resume_experiment(args.resume, int(n) if n is not None else None)
        Console().print(_results_table({result.method: result}, _metric(result)))
        print(f"run directory: {result.run_dir}")
        return
    if not args.config:
        raise ConfigError("fedlora run: give a CONFIG (a file, or a built-in name such as nlu-quick) or --resume RUN_DIR")
    cfg = as_config(args.config, args.set)
    if args.quiet:
        cfg.engine.progress = False
    from .api import run_experiment

    result = run_experiment(cfg, overwrite=args.overwrite)
    Console().print(_results_table({cfg.algorithm.name: result}, _metric(result)))
    print(f"run directory: {result.run_dir}")


def cmd_compare(args: argparse.Namespace) -> None:
    """`fedlora compare`: run several methods on the same config and print one table."""
    from .api import compare
    from .core.config import as_config

    cfg = as_config(args.config, args.set)
    if args.quiet:
        cfg.engine.progress = False
    results = compare(cfg, [m.strip() for m in args.methods.split(",") if m.strip()], overwrite=args.overwrite)
    Console().print(_results_table(results, _metric(next(iter(results.values())))))
    print(f"run directories under: {cfg.run_dir}")


def cmd_demo(args: argparse.Namespace) -> None:
    """`fedlora demo`: compare methods on the built-in demo config and print the table."""
    from .api import compare
    from .core.config import as_config

    cfg = as_config("demo", args.set)
    if args.quiet:
        cfg.engine.progress = False
    console = Console()
    console.print(f"[bold]fedlora demo[/bold]: {cfg.model.name}, {cfg.data.dataset}, "
                  f"{cfg.federation.rounds} rounds, methods {args.methods}")
    results = compare(cfg, args.methods.split(","), overwrite=True)
    console.print(_results_table(results, "accuracy"))
    print(f"run directories under: {cfg.run_dir}")


def cmd_export(args: argparse.Namespace) -> None:
    """`fedlora export`: write a client's personalized model to a directory."""
    from .serving import export_client

    out = export_client(args.run_dir, args.client, args.out, save_base=False if args.no_base else None)
    print(f"exported {args.client} to {out}")


def cmd_predict(args: argparse.Namespace) -> None:
    """`fedlora predict`: print a client's prediction for each input text."""
    from .serving import predict, read_texts

    for answer in predict(args.run_dir, args.client, read_texts(args.file)):
        print(answer)


def cmd_report(args: argparse.Namespace) -> None:
    """`fedlora report`: write the Markdown report of a run or comparison directory."""
    from .engines.rundir import hold_run_dir
    from .reporting import group_runs, write_report

    with hold_run_dir(args.run_dir):  # a run still writing its records refuses the report
        groups = group_runs(args.run_dir)
        if len(groups) > 1:  # never merged into one table: say so, and in what the configs differ
            print(f"{args.run_dir} holds runs of {len(groups)} different configs (differing in "
                  f"{', '.join(groups[0].differs)}): one section each")
        print(f"report: {write_report(args.run_dir)}")


def cmd_prepare_data(args: argparse.Namespace) -> None:
    """`fedlora prepare-data`: make the offline corpora and models available."""
    from .api import prepare_data

    corpora = [c for c in args.corpora.split(",") if c] if args.corpora is not None else None
    prepare_data(corpora, [m for m in args.model.split(",") if m])


def cmd_deploy_app(args: argparse.Namespace) -> None:
    """`fedlora deploy app`: write a Flower app directory for a config."""
    from .core.config import as_config
    from .flower.app import write_app
    from .flower.credentials import supernode_names

    cfg = as_config(args.config, args.set)
    if args.credentials:
        clients = supernode_names(args.credentials)
    else:
        clients = [c.strip() for value in args.clients for c in value.split(",")] if args.clients else None
    app = write_app(args.app_dir, cfg, clients=clients)
    admitted = f"admits client ids {', '.join(clients)}" if clients else "admits any client id (no --clients given)"
    import re
    import shlex

    # a suggested directory named after the experiment, in characters no shell or TOML quoting can break
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.name).strip("-.") or "run"
    output_dir = shlex.quote(f'set.output_dir="/srv/fedlora/runs/{slug}"')
    print(f"Flower app for {cfg.name!r} ({cfg.algorithm.name}) written to {app}/pyproject.toml; it {admitted}\n"
          f"submit it with: flwr run {shlex.quote(str(app))} <superlink connection> --stream -c {output_dir} "
          "(a new or empty directory on the SuperLink's machine)")


def cmd_deploy_credentials(args: argparse.Namespace) -> None:
    """`fedlora deploy credentials`: write a CA, SuperLink TLS files and SuperNode keys."""
    from .flower.credentials import write_credentials

    creds = write_credentials(args.out, args.supernode, args.host, overwrite=args.force)
    print(f"CA certificate {creds.ca_cert} (give it to every SuperNode and to the flwr CLI)\n"
          f"SuperLink certificate and key {creds.server_cert}, {creds.server_key} (valid for {', '.join(creds.hosts)})")
    for name, key in creds.supernode_keys.items():
        print(f"SuperNode {name}: private key {key} (give to that data owner only), register {creds.public_key(name)}")


def cmd_deploy_fleet_gateway(args: argparse.Namespace) -> None:
    """`fedlora deploy fleet-gateway`: serve a SuperLink's Fleet API, and only that, on a public address."""
    from .flower.gateway import serve_fleet_gateway

    serve_fleet_gateway(args.credentials, args.listen, args.superlink)


def cmd_methods(args: argparse.Namespace) -> None:
    """`fedlora methods`: list the methods (installed plug-ins included), their summaries, option defaults and whether
    they run under secure aggregation."""
    from .algorithms import available_methods

    for m in available_methods().values():
        opts = ", ".join(f"{k}={f.default!r}" for k, f in m.options.model_fields.items())
        secure = "yes" if m.secure_problem is None else f"no ({m.secure_problem})"
        print(f"{m.name:10s} {m.summary}" + (f"\n{'':10s} options: {opts}" if opts else "")
              + f"\n{'':10s} secure aggregation: {secure}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `fedlora` command."""
    from .core.config import builtin_configs  # pydantic only, no torch
    parser = argparse.ArgumentParser(prog="fedlora", description="Personalized federated LoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
        p.add_argument("--quiet", action="store_true", help="no progress display")
        p.add_argument("--verbose", action="store_true",
                       help="other libraries' warnings (Flower, Ray, torch) on the console too, not only in run.log")

    p = sub.add_parser("run", help="run one experiment from a TOML/YAML config or a built-in one (nlu-quick, ...)")
    p.add_argument("config", nargs="?", help=f"a TOML/YAML file or a built-in name ({', '.join(builtin_configs())})")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="run several methods on the same split, seed and evaluation")
    p.add_argument("config", help="a TOML/YAML file or a built-in name")
    p.add_argument("--methods", required=True, help="comma-separated, e.g. local,fedit")
    p.add_argument("--overwrite", action="store_true", help="replace existing run directories")
    common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the default demo: MiniLM on bundled WordNet tasks, local vs fedit")
    p.add_argument("--methods", default="local,fedit")
    common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="write a client's personalized model (PEFT adapters + router/gate + loader data)")
    p.add_argument("run_dir")
    p.add_argument("--client", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--no-base", action="store_true", help="never save the base model into the export (by default "
                   "it is saved when PEFT could not load that exact base otherwise; docs/models.md)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="a client's predictions for texts read from a file or standard input")
    p.add_argument("run_dir")
    p.add_argument("--client", required=True)
    p.add_argument("--file", default=None, help="one text per line (default: standard input)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="write a Markdown report with PNG plots for a run or a comparison directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("prepare-data", help="install or unpack the offline corpora (and models) the suites need")
    p.add_argument("--corpora", default=None, help="comma-separated subset of wordnet,fortunes,reviews (default: all)")
    p.add_argument("--model", default="", help="also fetch and convert a model: smollm2")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("deploy", help="take an experiment onto a Flower deployment (docs/deployment.md)")
    deploy = p.add_subparsers(dest="deploy_command", required=True)
    q = deploy.add_parser("app", help="write a Flower app directory that runs a config on a SuperLink")
    q.add_argument("app_dir")
    q.add_argument("config", help="a TOML/YAML file or a built-in name")
    q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    admitted = q.add_mutually_exclusive_group()
    admitted.add_argument("--clients", action="append", default=[], metavar="ID[,ID...]",
                          help="the client ids the server admits (engine.clients); a node claiming another is left out")
    admitted.add_argument("--credentials", metavar="DIR",
                          help="admit the SuperNode names of this `deploy credentials` directory as the client ids")
    q.set_defaults(func=cmd_deploy_app)
    q = deploy.add_parser("credentials", help="write a CA, a SuperLink TLS certificate and SuperNode key pairs")
    q.add_argument("out")
    q.add_argument("--supernode", action="append", required=True, metavar="NAME", help="one per data owner")
    q.add_argument("--host", action="append", default=None, metavar="HOST",
                   help="the SuperLink's addresses as SuperNodes reach it (default: 127.0.0.1 and localhost; "
                        "127.0.0.1 is always added)")
    q.add_argument("--force", action="store_true",
                   help="replace credentials already in OUT (a new CA: every certificate and key handed out is void)")
    q.set_defaults(func=cmd_deploy_credentials)
    q = deploy.add_parser("fleet-gateway", help="serve a SuperLink's Fleet API (and nothing else) on a public "
                          "address, HTTPS with the credentials' SuperLink certificate")
    q.add_argument("credentials", help="the directory `deploy credentials` wrote (ca.crt, superlink.crt/.key)")
    q.add_argument("--listen", default="0.0.0.0:9092", metavar="HOST:PORT",
                   help="where SuperNodes connect (default: 0.0.0.0:9092)")
    q.add_argument("--superlink", default="127.0.0.1:9093", metavar="HOST:PORT",
                   help="the SuperLink's --host:--port on this machine (default: 127.0.0.1:9093)")
    q.set_defaults(func=cmd_deploy_fleet_gateway)

    p = sub.add_parser("methods", help="list the methods and their options")
    p.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedlora` console script."""
    use_offline()
    args = build_parser().parse_args(argv)
    if getattr(args, "host", "") is None:
        args.host = ["127.0.0.1", "localhost"]
    from .core.errors import FedloraError

    if getattr(args, "verbose", False):
        os.environ["FEDLORA_VERBOSE"] = "1"  # the environment: Flower's processes started by this one see it too
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("fedlora: interrupted (what was checkpointed is kept: `fedlora run --resume RUN_DIR` continues a run)",
              file=sys.stderr)
        # a Flower simulation's server thread would keep the interpreter alive to its last round: leave now
        # (every file fedlora writes is written atomically, and the run-directory lock is the kernel's)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except FedloraError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's, not fedlora's: one line that says which file and what to do
        where = f" ({exc.filename})" if exc.filename else ""
        hint = {errno.ENOSPC: "free disk space, then continue the run with --resume (what it wrote is kept)",
                errno.EDQUOT: "free disk space, then continue the run with --resume (what it wrote is kept)",
                errno.EACCES: "check the permissions of that path",
                errno.EROFS: "choose a writable output_dir"}.get(exc.errno, "")
        print(f"fedlora: error: {exc.strerror or exc}{where}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
