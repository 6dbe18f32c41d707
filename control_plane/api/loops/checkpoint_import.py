"""``POST /v1/loops/checkpoints/import`` (an openloops extension): a PEFT LoRA adapter directory,
sent as a tar archive (gzip-compressed or not), becomes one of the org's ``sampler_weights``
checkpoints (:mod:`control_plane.services.checkpoint_import`)::

    tar -C ./my-adapter -cz adapter_config.json adapter_model.safetensors | curl --data-binary @- \\
        -H "Authorization: Bearer $KEY" "$BASE/v1/loops/checkpoints/import?base_model=...&name=..."

The archive holds ``adapter_config.json`` and ``adapter_model.safetensors`` at its top or in one
directory; other files (a README, tokenizer files) are ignored and named in the answer. The body
is streamed to a temporary file, at most ``checkpoint_import_limit_bytes`` (413 past it).
"""

from __future__ import annotations

import asyncio
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
from litestar import Controller, Request, post
from litestar.di import Provide
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType

from control_plane.api.auth import provide_principal
from control_plane.api.fields import query_text
from control_plane.api.loops import presenters as p
from control_plane.api.loops.responses import LoopsCheckpoint
from control_plane.api.loops.training import ORG
from control_plane.api.openapi import raises
from control_plane.api.state import rt
from control_plane.auth.principal import Principal
from control_plane.db import models as m
from control_plane.errors import InvalidInput, PayloadTooLarge
from control_plane.fields import column_length
from control_plane.services import checkpoint_import as imp
from data_plane.wire.peft_adapter import ADAPTER_FILES

MAX_MEMBERS = 10_000  # entries of the archive looked at


class ImportedCheckpoint(msgspec.Struct):
    checkpoint: LoopsCheckpoint  # as GET /v1/loops/checkpoints lists it (checkpoint_path: a base_checkpoint)
    lora_rank: int
    lora_alpha: float
    train_attn: bool
    train_mlp: bool
    train_unembed: bool
    files: list[str]  # what was stored
    ignored_files: list[str]  # archive entries that are not part of the adapter


@dataclass
class TarBodyOperation(Operation):
    """The operation of the import route: its body is a tar archive the handler streams."""

    def __post_init__(self) -> None:
        binary = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY))
        self.request_body = RequestBody(
            required=True,
            description="a tar archive (optionally gzip-compressed) holding adapter_config.json and "
            "adapter_model.safetensors",
            content={"application/x-tar": binary, "application/gzip": binary},
        )


async def _receive(request: Request, dest: Path, limit: int) -> None:
    announced = request.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise PayloadTooLarge(f"the archive is {announced} bytes; the import limit is {limit} bytes")
    size = 0
    with dest.open("wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the archive exceeds the import limit of {limit} bytes")
            f.write(chunk)
    if size == 0:
        raise InvalidInput("the body is empty: send the adapter directory as a tar archive", field="body")


def extract_adapter(archive: Path, dest: Path, limit: int) -> list[str]:
    """Copy the adapter files of ``archive`` into ``dest``; returns the entries left out."""
    try:
        tf = tarfile.open(archive, mode="r:*")  # noqa: SIM115 - closed below, after the errors of opening
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidInput(f"the body is not a tar archive (gzip-compressed or not): {exc}", field="body") from None
    found: dict[str, str] = {}
    ignored: list[str] = []
    total = 0
    with tf:
        try:
            for i, member in enumerate(tf):
                if i >= MAX_MEMBERS:
                    raise InvalidInput(f"the archive has more than {MAX_MEMBERS} entries", field="body")
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                if member.isdir() or not parts:
                    continue
                if parts[-1] not in ADAPTER_FILES or len(parts) > 2 or ".." in parts:
                    ignored.append(member.name)
                    continue
                base = parts[-1]
                if not member.isfile():
                    raise InvalidInput(f"{member.name} in the archive is a link or special file", field="body")
                if base in found:
                    raise InvalidInput(f"the archive holds {base} twice ({found[base]}, {member.name})", field="body")
                total += member.size
                if total > limit:
                    raise PayloadTooLarge(f"the adapter files exceed the import limit of {limit} bytes")
                src = tf.extractfile(member)
                assert src is not None  # a regular file
                with src, (dest / base).open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                found[base] = member.name
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InvalidInput(f"the archive is truncated or corrupt: {exc}", field="body") from None
    dirs = {p.rpartition("/")[0].strip("./") for p in found.values()}
    if len(dirs) > 1:
        raise InvalidInput(
            f"the adapter files are in different directories of the archive: {sorted(dirs)}", field="body"
        )
    return ignored


class LoopsCheckpointImportController(Controller):
    path = "/v1/loops"
    dependencies = {"principal": Provide(provide_principal)}
    tags = ["loops"]

    @post(
        "/checkpoints/import",
        opt=ORG,
        status_code=200,
        request_max_body_size=None,  # streamed; checkpoint_import_limit_bytes is enforced while reading
        operation_class=TarBodyOperation,
        responses=raises(InvalidInput, PayloadTooLarge),
    )
    async def import_checkpoint(
        self,
        request: Request,
        principal: Principal,
        base_model: Annotated[
            str, query_text(max_length=column_length(m.Run.base_model), description="the catalog model it adapts")
        ],
        name: Annotated[
            str | None, query_text(max_length=200, description=f"the checkpoint's name (default {imp.DEFAULT_NAME})")
        ] = None,
    ) -> ImportedCheckpoint:
        """Import a PEFT LoRA adapter (a tar archive of its directory) as a ``sampler_weights``
        checkpoint: deployable, and a run's ``base_checkpoint``. A 400 names what does not fit
        (not LoRA, an unknown base model, a rank over the limit, shapes of another model)."""
        r = rt(request)
        limit = r.settings.checkpoint_import_limit_bytes
        work = r.settings.data_dir / "tmp"
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work, prefix="import-") as tmp:
            archive, adapter = Path(tmp) / "body", Path(tmp) / "adapter"
            adapter.mkdir()
            await _receive(request, archive, limit)
            ignored = await asyncio.to_thread(extract_adapter, archive, adapter, limit)
            archive.unlink()
            done = await imp.import_adapter(
                r.db, r.store, r.catalog, principal, directory=adapter, base_model=base_model, name=name
            )
        a = done.adapter
        return ImportedCheckpoint(
            checkpoint=p.checkpoint_json(done.checkpoint),
            lora_rank=a.rank,
            lora_alpha=a.alpha,
            train_attn=a.train_attn,
            train_mlp=a.train_mlp,
            train_unembed=a.train_unembed,
            files=sorted(ADAPTER_FILES),
            ignored_files=ignored,
        )
