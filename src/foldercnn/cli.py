"""Command line: parses arguments and calls the package's functions; no logic of its own.

Each command imports what it needs when it runs, so `foldercnn --help` and `--version` import neither PyTorch
nor matplotlib. Process-wide speed settings (threads, allocator) are applied here, by `runtime.setup()`,
for the commands that compute.
"""
import argparse
import json
import math
import sys

from .errors import FolderCNNError
from .version import __version__


def whole(lo, hi):
    """An argparse type: a whole number in [lo, hi] (a 5,000-digit seed or port 99999 is refused here)."""
    def parse(text):
        if len(text) > 24:
            raise argparse.ArgumentTypeError(f"{text[:12]}... is not a whole number between {lo:,} and {hi:,}")
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is not between {lo:,} and {hi:,}")
        return value
    return parse


def number(lo, hi, lo_open=False, hi_open=False):
    """An argparse type: a finite number in the range (nan, inf and 1e308 learning rates are refused here)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        low_ok = value > lo if lo_open else value >= lo
        high_ok = value < hi if hi_open else value <= hi
        if not (math.isfinite(value) and low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"{text} is not a number {'>' if lo_open else '>='} {lo:g} and "
                                             f"{'<' if hi_open else '<='} {hi:g}")
        return value
    return parse


SEED_MAX = 2**32 - 1  # numpy's and torch's generators both take it


def _setup_runtime():
    from . import runtime
    runtime.setup()


def _add_training_options(p, default_recipe="fast", recipe_help=None):
    p.add_argument("--recipe", default=default_recipe,
                   help=f"training recipe (default: {recipe_help or default_recipe}); `foldercnn models` lists them")
    p.add_argument("--model", help="architecture (default: the recipe's); see `foldercnn models`")
    p.add_argument("--epochs", type=whole(1, 100_000))
    p.add_argument("--batch-size", type=whole(1, 65_536))
    p.add_argument("--image-size", type=whole(1, 100_000), help="side of the square network input, in pixels")
    p.add_argument("--lr", type=number(0, 10, lo_open=True), help="learning rate")
    p.add_argument("--no-augment", action="store_true",
                   help="train on the images exactly as they are, without the recipe's random changes")
    p.add_argument("--time-budget", type=number(0, 10_000_000, lo_open=True), metavar="SECONDS",
                   help="train until this much wall clock (decoding included) is spent, then keep the best epoch")
    p.add_argument("--seed", type=whole(0, SEED_MAX), default=0, help="makes the run repeatable (default 0)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bfloat16 autocast where the CPU supports it natively, else float32")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the GPU when PyTorch sees one (CUDA), else the CPU")


def build_parser():
    parser = argparse.ArgumentParser(prog="foldercnn", description=(
        "Turn a folder of labelled images (one sub-folder per class) into a trained, evaluated image "
        "classifier, on a CPU."))
    parser.add_argument("--version", action="version", version=f"foldercnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="summarise a labelled folder and draw samples.png")
    p.add_argument("data_dir")
    p.add_argument("--out", help="folder for samples.png (default: no picture)")
    p.add_argument("--against", metavar="TEST_DIR",
                   help="list images of TEST_DIR that nearly duplicate images of DATA_DIR (leaks)")

    p = sub.add_parser("train", help="train a classifier; writes RUN_DIR/model.safetensors, plots and report.html")
    p.add_argument("data_dir")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val", help="validation folder with the same class sub-folders")
    val.add_argument("--val-fraction", type=number(0, 1, lo_open=True, hi_open=True), help="hold out this stratified fraction (default 0.2)")
    p.add_argument("--split", choices=["groups", "images"], default="groups",
                   help="how --val-fraction holds images out: 'groups' (default) keeps near-duplicates (burst "
                        "frames, copies) on one side so validation does not flatter; 'images': image by image")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--fine-tune", action="store_true",
                   help="for a recipe with a linear probe (transfer): then also train the last blocks")
    p.add_argument("--resume", nargs="?", const=True, choices=[True, "force"], type=lambda v: v,
                   help="continue from RUN_DIR/checkpoint.safetensors (an interrupted run is continued anyway, "
                        "with a message); 'force': even if the data folder or the recipe changed")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint left in RUN_DIR and start over")
    p.add_argument("--uncertain-below", type=number(0, 1), metavar="P",
                   help="predictions whose calibrated top probability is below P are marked uncertain "
                        "(stored in the model; default 0.8)")
    p.add_argument("--nproc", type=whole(1, 1024), metavar="N",
                   help="train one model in N processes on this machine (runs torchrun; --batch-size stays the "
                        "global batch, split between them); see README for several machines")
    _add_training_options(p)

    p = sub.add_parser("evaluate", help="accuracy with its 95%% interval, per-class metrics, confusion matrix, "
                                        "worst mistakes and calibration on a labelled folder")
    p.add_argument("model")
    p.add_argument("data_dir", nargs="+", help="the test folder, then any other labelled folders (photos from "
                                               "other people, rooms, cameras): one summary row each")
    p.add_argument("--json", action="store_true", help="print one JSON object with every number (a list of them, "
                                                       "one per folder, when several folders are given)")
    p.add_argument("--out", help="write evaluation.json, confusion.png, mistakes.png, calibration.png and "
                                 "report.html here (give the run folder to complete its report)")
    p.add_argument("--tta", action="store_true", help="average each prediction with its mirror image's")

    p = sub.add_parser("report", help="re-create RUN_DIR/report.html from the files in the run folder")
    p.add_argument("run_dir")
    p.add_argument("--model", help="model file (default RUN_DIR/model.safetensors)")

    p = sub.add_parser("predict", help="classify images or folders of images")
    p.add_argument("model", help="a model.safetensors, or a .onnx file from `foldercnn export` (no PyTorch needed)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--top-k", type=whole(1, 10_000), help="show only the K most probable classes")

    p = sub.add_parser("export", help="write an ONNX file with the preprocessing inside (and an int8 copy)")
    p.add_argument("model")
    p.add_argument("--format", default="onnx", help="onnx (the only one so far)")
    p.add_argument("--out", help="the .onnx file to write (default: beside the model file)")
    p.add_argument("--int8", action="store_true", help="also write MODEL.int8.onnx (static int8 quantisation) "
                                                       "and print its accuracy cost and speed gain")
    p.add_argument("--calibration-dir", help="images to calibrate --int8 on (default: the model's training folder)")
    p.add_argument("--opset", type=whole(18, 23), default=18, help="ONNX opset, 18 to 23 (default 18)")

    p = sub.add_parser("demo", help="the Rock-Paper-Scissors tutorial's whole journey in one command")
    p.add_argument("--data", help="folder with train/ (and test/, validation/); default: find or download")
    p.add_argument("--out", default="foldercnn-demo", help="where outputs go (default ./foldercnn-demo)")
    p.add_argument("--photos", help="real photos of hands (rock/paper/scissors folders, or folders of them) to "
                                    "measure the model on; default $FOLDERCNN_RPS_PHOTOS_DIR when set")
    _add_training_options(p, default_recipe=None,
                          recipe_help="hands (robust without MediaPipe Hands), for real photos of hands; fast for the "
                                      "offline digits")

    sub.add_parser("models", help="list the architectures and recipes")

    p = sub.add_parser("serve", help="a local web page (upload or webcam) and REST API for a model file")
    p.add_argument("model")
    add_server_options(p)
    p.add_argument("--teach", metavar="DATA_DIR", help="add the Teach panel: capture examples into DATA_DIR's class "
                                                       "folders, train, and serve the new model at once")
    add_teach_options(p)

    p = sub.add_parser("teach", help="the serve page with its Teach panel, starting without a model: capture "
                                     "examples per class from the camera or files, train, use the model")
    p.add_argument("data_dir", help="the class folders to teach from (created if missing; may be empty)")
    add_server_options(p)
    add_teach_options(p)
    return parser


def add_server_options(p):
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=whole(0, 65_535), default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=number(0.001, 10_000), default=10.0, help="largest accepted file, in MB (default 10)")
    p.add_argument("--max-files", type=whole(1, 10_000), default=16, help="most images in one request (default 16)")
    p.add_argument("--workers", type=whole(1, 256), help="inference threads (default: one per physical core)")


def add_teach_options(p):
    p.add_argument("--teach-runs", metavar="DIR", default="foldercnn-teach",
                   help="where each training writes its run folder (default ./foldercnn-teach)")
    p.add_argument("--teach-recipe", default="transfer",
                   help="recipe of the training jobs (default transfer: a linear probe, seconds)")
    p.add_argument("--teach-max-per-class", type=whole(1, 10_000_000), default=1000, help="most images per class (default 1000)")
    p.add_argument("--teach-max-images", type=whole(1, 10_000_000), default=10000, help="most images in all (default 10000)")
    p.add_argument("--allow-remote-teach", action="store_true",
                   help="let other machines teach (with --host other than 127.0.0.1): they can then write images")


def cmd_inspect(args):
    from .data.inspect import format_report, inspect_folder
    print(format_report(inspect_folder(args.data_dir, out_dir=args.out, against=args.against)))


def _overrides(args):
    return dict(model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                image_size=args.image_size, lr=args.lr, augment=False if args.no_augment else None)


def _stop_on_sigterm():
    """SIGTERM (a pre-empted machine, `kill`) stops training like Ctrl-C: the best finished epoch is saved."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)


def _without_nproc(argv):
    """The command line minus --nproc N (or --nproc=N): what each launched process runs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_train(args):
    from .training import distributed
    from .training.recipes import get_recipe
    if args.nproc < 1:
        raise FolderCNNError(f"--nproc must be at least 1, got {args.nproc}")
    if distributed.launched_world_size() > 1:
        raise FolderCNNError("--nproc starts torchrun; this command already runs under it")
    distributed.check_world(get_recipe(args.recipe, **_overrides(args)), args.nproc)  # refused here, not N times
    _stop_on_sigterm()
    return distributed.launch(_without_nproc(args.argv), args.nproc)


def cmd_train(args):
    if args.nproc is not None and args.nproc != 1:
        return launch_train(args)
    from .training.job import train_folder
    _setup_runtime()
    _stop_on_sigterm()
    if args.resume and args.restart:
        raise FolderCNNError("give --resume or --restart, not both")
    extra = {} if args.uncertain_below is None else {"uncertain_below": args.uncertain_below}
    extra["resume"] = False if args.restart else args.resume
    result = train_folder(args.data_dir, args.out, recipe=args.recipe, val_dir=args.val,
                          val_fraction=args.val_fraction, seed=args.seed, precision=args.precision,
                          device=args.device, time_budget=args.time_budget, fine_tune=args.fine_tune,
                          split=args.split, **extra,
                          **_overrides(args))
    if not result.main_process:  # under torchrun rank 0 speaks for all
        return 130 if result.interrupted else 0
    best = result.history[result.best_epoch - 1]
    print(f"saved {result.model_path} (epoch {result.best_epoch}, val_accuracy {best['val_accuracy']:.4f}); "
          f"plots and history.csv in {result.out_dir}")
    return 130 if result.interrupted else 0


def cmd_evaluate(args):
    from .evaluation.metrics import folder_row, format_evaluation, format_folder_table
    from .evaluation.report import evaluate_to_folder
    _setup_runtime()
    evs, report = evaluate_to_folder(args.model, args.data_dir, args.out, tta=True if args.tta else None)
    if args.json:
        print(json.dumps(evs[0].to_dict() if len(evs) == 1 else [ev.to_dict() for ev in evs]))
    else:
        print(format_evaluation(evs[0]))
        if len(evs) > 1:
            print("\none row per folder (the first is the test folder above):")
            print(format_folder_table([folder_row(ev.to_dict()) for ev in evs]))
    if report:
        print(f"wrote evaluation.json, confusion.png, mistakes.png, calibration.png and {report}",
              file=sys.stderr if args.json else sys.stdout)


def cmd_report(args):
    from pathlib import Path

    from .evaluation.report import write_report
    run = Path(args.run_dir)
    if not run.is_dir():
        raise FolderCNNError(f"run folder not found: {run}")
    print(f"wrote {write_report(run, args.model)}")


def cmd_predict(args):
    from .deploy.onnx_predict import is_onnx, load_any
    from .deploy.predict import prediction_rows, predict_paths
    if args.top_k is not None and args.top_k < 1:
        raise FolderCNNError("--top-k must be at least 1")
    if not is_onnx(args.model):  # an ONNX model runs on onnxruntime: PyTorch is not even imported
        _setup_runtime()
    predictions, skipped = predict_paths(load_any(args.model), args.paths)
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
            flag = ("  uncertain" if p.uncertain else "") + \
                ("  unfamiliar (does not look like the training images: a guess)" if p.unfamiliar else "")
            print(f"{p.path}: {p.label} ({p.probability:.1%}){flag}   [{others}]")
    if not predictions:
        raise FolderCNNError("no images to classify" + (" (every file was skipped)" if skipped else ""))


def cmd_demo(args):
    from .demo import run_demo
    _setup_runtime()
    run_demo(data=args.data, out=args.out, recipe=args.recipe, seed=args.seed, precision=args.precision,
             device=args.device, time_budget=args.time_budget, photos=args.photos, **_overrides(args))


def cmd_export(args):
    from .deploy.export import export_model
    _setup_runtime()
    export_model(args.model, args.out, fmt=args.format, int8=args.int8, calibration_dir=args.calibration_dir,
                 opset=args.opset)


def cmd_models(args):
    from .models.registry import available_models, get_spec
    from .training.recipes import describe_recipes
    for name in available_models():
        spec = get_spec(name)
        can = [c for c, ok in (("pretrained weights", spec.pretrained), ("linear probe", spec.linear_probe),
                               (f"fine-tunes up to {spec.fine_tune_blocks} blocks", spec.fine_tune_blocks)) if ok]
        print(f"model {name}: {spec.description}; input at least {spec.min_image_size} px"
              + (f"; {', '.join(can)}" if can else ""))
    for line in describe_recipes():
        print(f"recipe {line}")


def serve(args, model, teach_dir):
    from .deploy.serve import run_server
    from .deploy.teach import TeachConfig
    teach = None if teach_dir is None else TeachConfig(
        teach_dir, args.teach_runs, recipe=args.teach_recipe, max_per_class=args.teach_max_per_class,
        max_images=args.teach_max_images)
    run_server(model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
               max_files=args.max_files, workers=args.workers, teach=teach, allow_remote_teach=args.allow_remote_teach)


def cmd_serve(args):
    serve(args, args.model, args.teach)


def cmd_teach(args):
    from pathlib import Path
    if not Path(args.data_dir).exists():
        print(f"foldercnn: {args.data_dir} does not exist yet: it is created with the first class you add",
              flush=True)
    serve(args, None, args.data_dir)


COMMANDS = {"inspect": cmd_inspect, "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "demo": cmd_demo, "models": cmd_models, "serve": cmd_serve, "export": cmd_export,
            "report": cmd_report, "teach": cmd_teach}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv  # train --nproc passes the command line on
    try:
        return COMMANDS[args.command](args) or 0
    except FolderCNNError as e:
        print(f"foldercnn: error: {e}", file=sys.stderr)
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
