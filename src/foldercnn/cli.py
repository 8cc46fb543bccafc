"""Command line: parses arguments and calls the package's functions; no logic of its own.

Each command imports what it needs when it runs, so `foldercnn --help` and `--version` import neither PyTorch
nor matplotlib. Process-wide speed settings (threads, allocator) are applied here, by `runtime.setup()`,
for the commands that compute.
"""

import contextlib
import json
import sys

from .cli_parser import build_parser
from .errors import FolderCNNError


def _setup_runtime():
    from . import runtime

    runtime.setup()


def cmd_inspect(args):
    from .data.inspect import format_report, inspect_folder

    print(format_report(inspect_folder(args.data_dir, out_dir=args.out, against=args.against)))


def _overrides(args):
    return dict(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        start_size=args.start_size,
        lr=args.lr,
        fine_tune=args.fine_tune,
        augment=False if args.no_augment else None,
    )


def _stop_on_sigterm():
    """SIGTERM (a pre-empted machine, `kill`) stops training like Ctrl-C: the best finished epoch is saved."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


RESUME_MODES = {None: "auto", True: "require", "force": "force"}


def train_options(args):
    from .training.options import TrainOptions

    return TrainOptions.of(
        recipe=args.recipe,
        val_dir=args.val,
        val_fraction=args.val_fraction,
        split=args.split,
        seed=args.seed,
        precision=args.precision,
        device=args.device,
        time_budget=args.time_budget,
        refit=args.refit,
        uncertain_below=args.uncertain_below,
        resume="ignore" if args.restart else RESUME_MODES[args.resume],
        **_overrides(args),
    )


def cmd_train(args):
    from .events import JsonLines

    options = train_options(args)
    _stop_on_sigterm()
    if args.nproc is not None and args.nproc != 1:
        from .training import distributed

        return distributed.launch(args.argv, args.nproc, options.make_recipe())
    from .training.job import train_folder

    _setup_runtime()
    sink = JsonLines(args.events) if args.events else None
    log = (lambda text: print(text, file=sys.stderr)) if args.events == "-" else print  # stdout: the events
    try:
        result = train_folder(args.data_dir, args.out, options, log=log, on_event=sink)
    finally:
        if sink:
            sink.close()
    if not result.main_process:  # under torchrun rank 0 speaks for all
        return 130 if result.interrupted else 0
    best = result.history[result.best_epoch - 1]
    log(
        f"saved {result.model_path} (epoch {result.best_epoch}, val_accuracy {best['val_accuracy']:.4f}); "
        f"plots and history.csv in {result.out_dir}"
    )
    return 130 if result.interrupted else 0


def cmd_evaluate(args):
    from .evaluation.metrics import folder_row, format_evaluation, format_folder_table
    from .evaluation.report import evaluate_to_folder

    _setup_runtime()
    evs, report = evaluate_to_folder(
        args.model, args.data_dir, args.out, tta=True if args.tta else None, subject_mask=args.subject_mask
    )
    if args.json:
        print(json.dumps(evs[0].to_dict() if len(evs) == 1 else [ev.to_dict() for ev in evs]))
    else:
        print(format_evaluation(evs[0]))
        if len(evs) > 1:
            print("\none row per folder (the first is the test folder above):")
            print(format_folder_table([folder_row(ev.to_dict()) for ev in evs]))
    if report:
        print(
            f"wrote evaluation.json, confusion.png, mistakes.png, calibration.png and {report}",
            file=sys.stderr if args.json else sys.stdout,
        )


def cmd_report(args):
    from pathlib import Path

    from .evaluation.report import write_report

    run = Path(args.run_dir)
    if not run.is_dir():
        raise FolderCNNError(f"run folder not found: {run}")
    print(f"wrote {write_report(run, args.model)}")


def cmd_predict(args):
    from .deploy.predict import predict_paths, prediction_rows
    from .models.load import load
    from .models.onnx_model import is_onnx

    if not is_onnx(args.model):  # an ONNX model runs on onnxruntime: PyTorch is not even imported
        _setup_runtime()
    predictions, skipped = predict_paths(load(args.model), args.paths, explain_dir=args.explain)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(prediction_rows(predictions, args.top_k), indent=1))
    else:
        k = (args.top_k or len(predictions[0].probabilities)) if predictions else 0
        for p in predictions:
            if not p.answered:
                print(f"{p.path}: no hand found (the model classifies hands; nothing to say about this image)")
                continue
            others = "  ".join(f"{c} {v:.3f}" for c, v in p.top_k(k))
            flag = ("  uncertain" if p.uncertain else "") + (
                "  unfamiliar (does not look like the training images: a guess)" if p.unfamiliar else ""
            )
            print(f"{p.path}: {p.label} ({p.probability:.1%}){flag}   [{others}]")
    if not predictions:
        raise FolderCNNError("no images to classify" + (" (every file was skipped)" if skipped else ""))
    if args.explain:
        n = len(predictions)
        print(f"wrote {n} picture{'s' * (n != 1)} of where the model looked to {args.explain}", file=sys.stderr)


def cmd_demo(args):
    from .demo import run_demo

    _setup_runtime()
    run_demo(
        data=args.data,
        out=args.out,
        recipe=args.recipe,
        seed=args.seed,
        precision=args.precision,
        device=args.device,
        time_budget=args.time_budget,
        photos=args.photos,
        **_overrides(args),
    )


def cmd_export(args):
    from .deploy.export import export_model

    _setup_runtime()
    export_model(
        args.model, args.out, fmt=args.format, int8=args.int8, calibration_dir=args.calibration_dir, opset=args.opset
    )


def cmd_models(args):
    from .models.registry import available_models, get_spec
    from .training.recipes import describe_recipes

    for name in available_models():
        spec = get_spec(name)
        can = [
            c
            for c, ok in (
                ("pretrained weights", spec.pretrained),
                ("linear probe", spec.linear_probe),
                (f"fine-tunes up to {spec.fine_tune_blocks} blocks", spec.fine_tune_blocks),
            )
            if ok
        ]
        print(
            f"model {name}: {spec.description}; input at least {spec.min_image_size} px"
            + (f"; {', '.join(can)}" if can else "")
        )
    for line in describe_recipes():
        print(f"recipe {line}")


def serve(args, model, teach_dir):
    if teach_dir is not None and not args.teach_cold:
        from .deploy.teach_worker import prestart

        prestart(args.teach_recipe, args.teach_runs)  # its start overlaps the server's own
    from .deploy.serve import run_server
    from .deploy.teach import TeachConfig

    teach = (
        None
        if teach_dir is None
        else TeachConfig(
            teach_dir,
            args.teach_runs,
            recipe=args.teach_recipe,
            max_per_class=args.teach_max_per_class,
            max_images=args.teach_max_images,
            warm=not args.teach_cold,
        )
    )
    run_server(
        model,
        host=args.host,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        max_files=args.max_files,
        workers=args.workers,
        teach=teach,
        allow_remote_teach=args.allow_remote_teach,
    )


def cmd_serve(args):
    serve(args, args.model, args.teach)


def cmd_teach(args):
    from pathlib import Path

    if not Path(args.data_dir).exists():
        print(f"foldercnn: {args.data_dir} does not exist yet: it is created with the first class you add", flush=True)
    serve(args, None, args.data_dir)


# options whose flag is not their name with dashes
FLAGS = {
    "val_dir": "--val",
    "data_dir": "--teach",
    "max_per_class": "--teach-max-per-class",
    "max_images": "--teach-max-images",
}


def flag_message(error):
    """An error's message as the command line says it: an option named by its flag (val_fraction ->
    --val-fraction)."""
    from .errors import OptionError

    if not isinstance(error, OptionError):
        return str(error)
    return f"{FLAGS.get(error.option, '--' + error.option.replace('_', '-'))} {error.problem}"


COMMANDS = {
    "inspect": cmd_inspect,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "demo": cmd_demo,
    "models": cmd_models,
    "serve": cmd_serve,
    "export": cmd_export,
    "report": cmd_report,
    "teach": cmd_teach,
}


def printable_streams():
    """A file name need not be UTF-8 (names are bytes on POSIX; Python keeps the odd bytes as surrogates): print
    those characters as escapes (caf\\udce9.png) instead of failing on a strict UTF-8 terminal."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


def main(argv=None):
    printable_streams()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv  # train --nproc passes the command line on
    try:
        return COMMANDS[args.command](args) or 0
    except FolderCNNError as e:
        print(f"foldercnn: error: {flag_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("foldercnn: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permission denied, ...: say what and where, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"foldercnn: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
