"""`skqk import MODEL` (a network trained elsewhere) and `skqk export VERSION --format onnx`."""

from __future__ import annotations

from pathlib import Path

import typer

from app.cli.common import console, fail, finite_json, names, open_configured_store


def import_model_command(model: Path = typer.Argument(..., exists=True, dir_okay=False,
                                        help="MODEL.onnx, MODEL.pt2 (torch.export.save) or "
                                             "MODEL.safetensors"),
            data: Path | None = typer.Option(None, "--data", exists=True, dir_okay=False,
                                             help="the data the model was trained on (stored as "
                                                  "old samples)"),
            label_column: str | None = typer.Option(None, "--label-column", help="label column(s) of --data"),
            features: str | None = typer.Option(None, "--features", help="feature columns of --data, in the "
                                                                         "network's input order"),
            task: str = typer.Option("classification", help="classification | regression"),
            classes: str | None = typer.Option(None, help="class names in output order"),
            input_shape: str | None = typer.Option(None, "--input-shape", help="C,H,W (or D) when the file "
                                                                                "leaves it open"),
            activate: bool = typer.Option(False, help="make it the active version (automatic on an empty "
                                                      "store)"),
            strip_softmax: bool = typer.Option(
                False, "--strip-softmax", help="drop a final Softmax/LogSoftmax (and label outputs after "
                                               "it): serve the logits; predictions are unchanged")) -> None:
    """Register a network trained elsewhere; selector and estimator both start as its weights.

    Checked against the source model (onnxruntime / the exported program) before anything is
    stored; unsupported ops are refused by name.
    """
    from app.core.features import SchemaError
    from app.intake.importing import ImportMismatch, import_model
    from app.intake.networks import UnsupportedModel
    from app.intake.networks.torch_warnings import torch_deprecations_once

    shape = tuple(int(v) for v in names(input_shape)) if input_shape else None
    settings, store = open_configured_store()
    try:
        with torch_deprecations_once():  # torch's internal deprecations: once, not per call
            result = import_model(store, settings, model, data, names(label_column) or None,
                                  names(features) if features else None, task,
                                  names(classes) if classes else None, shape, activate,
                                  strip_softmax=strip_softmax)
    except (UnsupportedModel, ImportMismatch, SchemaError) as exc:
        fail(f"{model}: {exc}", 2)
    except ImportError as exc:  # onnx / onnxruntime / pyarrow not installed
        fail(f"{exc}: pip install 'skqk-serve[import,files]'", 2)
    except ValueError as exc:  # a data file problem (DataFileError) or a bad option
        fail(f"{exc}", 2)
    finally:
        store.dispose()
    state = "active" if result.activated else f"not active (POST /models/{result.version}/activate)"
    console.print(f"version {result.version} ({state}): imported {model.name}, max |diff| vs source "
                  f"{result.max_abs_diff:.3g}, {result.n_samples_stored} samples stored")
    for note in result.notes:
        console.print(f"  {note}")
    console.print_json(finite_json(result.metrics))


def export(version: int = typer.Argument(..., help="model version"),
           format: str = typer.Option("onnx", "--format", help="onnx"),
           output: Path = typer.Option(..., "-o", "--output", help="file to write")) -> None:
    """Write a served version (selector gates → estimator outputs) as one ONNX graph."""
    from app.serving.models import load_model, schema_of
    from app.storage import UnknownVersion

    if format != "onnx":
        fail("--format: only onnx is supported", 2)
    try:
        from app.intake.networks.onnx_export import export_onnx
    except ImportError as exc:
        fail(f"{exc}: pip install 'skqk-serve[import]'", 2)
    _settings, store = open_configured_store()
    try:
        model, record = load_model(store, version)
    except UnknownVersion as exc:
        fail(str(exc), 2)
    finally:
        store.dispose()
    schema = schema_of(record, model.spec)
    try:
        export_onnx(model, output, output_name="predictions" if schema.is_regression else "logits")
    except ImportError as exc:
        fail(f"{exc}: pip install 'skqk-serve[import]'", 2)
    console.print(f"version {version} → {output} (input [N, {', '.join(map(str, model.spec.input_shape))}])")
    if schema.encoding is not None:  # the graph takes the encoded vector: the encoding goes beside it
        from app.intake.networks.encoding_export import write_encoding

        side = write_encoding(schema, output)
        console.print(f"this version's columns have types: the graph's input is the ENCODED vector "
                      f"({schema.input_dim} inputs); the encoding that makes it from raw rows is in {side}")
