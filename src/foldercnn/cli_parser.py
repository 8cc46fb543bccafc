"""The command line's arguments: the parser, its option groups and the validators of numbers.

Only the command line speaks flags; the library's errors name options (errors.OptionError), and cli.py shows
them as flags.
"""

import argparse
import math

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
            raise argparse.ArgumentTypeError(
                f"{text} is not a number {'>' if lo_open else '>='} {lo:g} and {'<' if hi_open else '<='} {hi:g}"
            )
        return value

    return parse


SEED_MAX = 2**32 - 1  # numpy's and torch's generators both take it


def _add_training_options(p, default_recipe="fast", recipe_help=None):
    p.add_argument(
        "--recipe",
        default=default_recipe,
        help=f"training recipe (default: {recipe_help or default_recipe}); `foldercnn models` lists them",
    )
    p.add_argument("--model", help="architecture (default: the recipe's); see `foldercnn models`")
    p.add_argument("--epochs", type=whole(1, 100_000))
    p.add_argument("--batch-size", type=whole(1, 65_536))
    p.add_argument("--image-size", type=whole(1, 100_000), help="side of the square network input, in pixels")
    p.add_argument(
        "--start-size",
        type=whole(0, 100_000),
        help="train from this side up to --image-size (progressive resizing; 0: off; default: the recipe's)",
    )
    p.add_argument("--lr", type=number(0, 10, lo_open=True), help="learning rate")
    p.add_argument(
        "--fine-tune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="for a recipe with a linear probe: then also train the last blocks (transfer does by default; "
        "--no-fine-tune: the probe alone)",
    )
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="train on the images exactly as they are, without the recipe's random changes",
    )
    p.add_argument(
        "--time-budget",
        type=number(0, 10_000_000, lo_open=True),
        metavar="SECONDS",
        help="train until this much wall clock (decoding included) is spent, then keep the best epoch",
    )
    p.add_argument("--seed", type=whole(0, SEED_MAX), default=0, help="makes the run repeatable (default 0)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="auto: bfloat16 autocast where the CPU supports it natively, else float32",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: the GPU when PyTorch sees one (CUDA), else the CPU",
    )


def build_parser():
    parser = argparse.ArgumentParser(
        prog="foldercnn",
        description=(
            "Turn a folder of labelled images (one sub-folder per class) into a trained, evaluated image "
            "classifier, on a CPU."
        ),
    )
    parser.add_argument("--version", action="version", version=f"foldercnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="summarise a labelled folder and draw samples.png")
    p.add_argument("data_dir")
    p.add_argument("--out", help="folder for samples.png (default: no picture)")
    p.add_argument(
        "--against", metavar="TEST_DIR", help="list images of TEST_DIR that nearly duplicate images of DATA_DIR (leaks)"
    )

    p = sub.add_parser("train", help="train a classifier; writes RUN_DIR/model.safetensors, plots and report.html")
    p.add_argument("data_dir")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val", help="validation folder with the same class sub-folders")
    val.add_argument(
        "--val-fraction",
        type=number(0, 1, lo_open=True, hi_open=True),
        help="hold out this stratified fraction (default 0.2)",
    )
    p.add_argument(
        "--split",
        choices=["groups", "images"],
        default="groups",
        help="how --val-fraction holds images out: 'groups' (default) keeps near-duplicates (burst "
        "frames, copies) on one side so validation does not flatter; 'images': image by image",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument(
        "--refit",
        action="store_true",
        help="after the held-out split has chosen the epochs, train a fresh model on the whole folder for that many "
        "(about twice the time); its calibration and unfamiliarity threshold come from the first model's held-out "
        "images",
    )
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        nargs="?",
        const=True,
        choices=[True, "force"],
        type=lambda v: v,
        help="continue from RUN_DIR/checkpoint.safetensors (an interrupted run is continued anyway, "
        "with a message); 'force': even if the data folder or the recipe changed",
    )
    again.add_argument("--restart", action="store_true", help="ignore a checkpoint left in RUN_DIR and start over")
    p.add_argument(
        "--events",
        metavar="FILE",
        help="also write what the run does as JSON lines (stages, epochs, progress, errors) to FILE; "
        "'-': to standard output (the console's lines then go to standard error)",
    )
    p.add_argument(
        "--uncertain-below",
        type=number(0, 1),
        metavar="P",
        default=0.8,
        help="predictions whose calibrated top probability is below P are marked uncertain "
        "(stored in the model; default 0.8)",
    )
    p.add_argument(
        "--nproc",
        type=whole(1, 1024),
        metavar="N",
        help="train one model in N processes on this machine (runs torchrun; --batch-size stays the "
        "global batch, split between them); see README for several machines",
    )
    _add_training_options(p)

    p = sub.add_parser(
        "evaluate",
        help="accuracy with its 95%% interval, per-class metrics, confusion matrix, "
        "worst mistakes and calibration on a labelled folder",
    )
    p.add_argument("model")
    p.add_argument(
        "data_dir",
        nargs="+",
        help="the test folder, then any other labelled folders (photos from "
        "other people, rooms, cameras): one summary row each",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with every number (a list of them, one per folder, when several folders are given)",
    )
    p.add_argument(
        "--out",
        help="write evaluation.json, confusion.png, mistakes.png, calibration.png and "
        "report.html here (give the run folder to complete its report)",
    )
    p.add_argument("--tta", action="store_true", help="average each prediction with its mirror image's")
    p.add_argument(
        "--subject-mask",
        choices=("auto", "green", "plain", "off"),
        default="auto",
        help="how to find the subject for 'does it look at the subject?': auto (a green screen by its colour, "
        "another plain background by its border; default), green, plain, or off (not measured)",
    )

    p = sub.add_parser("report", help="re-create RUN_DIR/report.html from the files in the run folder")
    p.add_argument("run_dir")
    p.add_argument("--model", help="model file (default RUN_DIR/model.safetensors)")

    p = sub.add_parser("predict", help="classify images or folders of images")
    p.add_argument("model", help="a model.safetensors, or a .onnx file from `foldercnn export` (no PyTorch needed)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--top-k", type=whole(1, 10_000), help="show only the K most probable classes")
    p.add_argument(
        "--explain",
        metavar="OUT_DIR",
        help="also write one PNG per image to OUT_DIR: where the model looked (a heat map; for a hands model the "
        "skeleton) with its answer in the corner",
    )

    p = sub.add_parser("export", help="write an ONNX file with the preprocessing inside (and an int8 copy)")
    p.add_argument("model")
    p.add_argument("--format", default="onnx", help="onnx (the only one so far)")
    p.add_argument("--out", help="the .onnx file to write (default: beside the model file)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write MODEL.int8.onnx (static int8 quantisation) and print its accuracy cost and speed gain",
    )
    p.add_argument("--calibration-dir", help="images to calibrate --int8 on (default: the model's training folder)")
    p.add_argument("--opset", type=whole(18, 23), default=18, help="ONNX opset, 18 to 23 (default 18)")

    p = sub.add_parser("demo", help="the Rock-Paper-Scissors tutorial's whole journey in one command")
    p.add_argument("--data", help="folder with train/ (and test/, validation/); default: find or download")
    p.add_argument("--out", default="foldercnn-demo", help="where outputs go (default ./foldercnn-demo)")
    p.add_argument(
        "--photos",
        help="real photos of hands (rock/paper/scissors folders, or folders of them) to "
        "measure the model on; default $FOLDERCNN_RPS_PHOTOS_DIR when set",
    )
    _add_training_options(
        p,
        default_recipe=None,
        recipe_help="hands (robust without foldercnn[hands]), for real photos of hands; fast for the offline digits",
    )

    sub.add_parser("models", help="list the architectures and recipes")

    p = sub.add_parser("serve", help="a local web page (upload or webcam) and REST API for a model file")
    p.add_argument("model")
    add_server_options(p)
    p.add_argument(
        "--teach",
        metavar="DATA_DIR",
        help="add the Teach panel: capture examples into DATA_DIR's class "
        "folders, train, and serve the new model at once",
    )
    add_teach_options(p)

    p = sub.add_parser(
        "teach",
        help="the serve page with its Teach panel, starting without a model: capture "
        "examples per class from the camera or files, train, use the model",
    )
    p.add_argument("data_dir", help="the class folders to teach from (created if missing; may be empty)")
    add_server_options(p)
    add_teach_options(p)
    return parser


def add_server_options(p):
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=whole(0, 65_535), default=8000, help="port (default 8000)")
    p.add_argument(
        "--max-upload-mb", type=number(0.001, 10_000), default=10.0, help="largest accepted file, in MB (default 10)"
    )
    p.add_argument("--max-files", type=whole(1, 10_000), default=16, help="most images in one request (default 16)")
    p.add_argument("--workers", type=whole(1, 256), help="inference threads (default: one per physical core)")


def add_teach_options(p):
    p.add_argument(
        "--teach-runs",
        metavar="DIR",
        default="foldercnn-teach",
        help="where each training writes its run folder (default ./foldercnn-teach)",
    )
    p.add_argument(
        "--teach-recipe",
        default="probe",
        help="recipe of the training jobs (default probe: a linear probe on features kept per capture, seconds)",
    )
    p.add_argument(
        "--teach-max-per-class", type=whole(1, 10_000_000), default=1000, help="most images per class (default 1000)"
    )
    p.add_argument(
        "--teach-max-images", type=whole(1, 10_000_000), default=10000, help="most images in all (default 10000)"
    )
    p.add_argument(
        "--teach-cold",
        action="store_true",
        help="no warm worker: every training job is a new `foldercnn train` process that computes every feature "
        "again (slower; saves the worker's memory)",
    )
    p.add_argument(
        "--allow-remote-teach",
        action="store_true",
        help="let other machines teach (with --host other than 127.0.0.1): they can then write images",
    )
