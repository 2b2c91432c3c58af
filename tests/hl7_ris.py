"""A RIS for tests: python-hl7's asyncio MLLP server (``hl7.mllp.start_hl7_server``), run as
a subprocess so that a test can kill it, answering each ORU as told.

``python tests/hl7_ris.py --log FILE [--answers aa,ae,...] [--reason TEXT] [--tls CERT KEY]``
prints ``listening PORT`` when it accepts connections. Each message received is appended to
the log as one JSON line ``{"control_id", "answer", "message"}`` (flushed and fsynced) before
it is answered. ``--answers`` gives the answer to the 1st, 2nd, ... message (the last one
repeats): ``aa``, ``ae``, ``ar`` (an ACK built by python-hl7's ``create_ack``, with
``--reason`` in MSA-3 for ae and ar), ``garbage`` (an MLLP block that is not HL7), ``wrongid``
(an AA for another control ID), ``half`` (half an ACK, then the connection closes), ``close``
(the connection closes unanswered), ``silent`` (no answer, the connection stays open).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from pathlib import Path

import hl7
from hl7.mllp import start_hl7_server


class RIS:
    def __init__(self, log: Path, answers: list[str], reason: str) -> None:
        self.log = log
        self.answers = answers
        self.reason = reason
        self.count = 0

    def _next_answer(self) -> str:
        answer = self.answers[min(self.count, len(self.answers) - 1)]
        self.count += 1
        return answer

    def _record(self, message: hl7.Message, answer: str) -> None:
        line = json.dumps({"control_id": str(message.segment("MSH")(10)), "answer": answer,
                           "message": str(message)})
        with self.log.open("a") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())

    def _ack(self, message: hl7.Message, code: str, control_id: str | None = None) -> str:
        ack = message.create_ack(code, message_id="ACK" + str(self.count),
                                 application="TESTRIS", facility="TESTHOSP")
        text = str(ack).rstrip("\r")
        if control_id is not None:
            text = text.replace(f"MSA|{code}|{message.segment('MSH')(10)}",
                                f"MSA|{code}|{control_id}")
        if code != "AA" and self.reason:
            text += "|" + message.escape(self.reason)
        return text

    async def handle(self, reader: hl7.mllp.HL7StreamReader,
                     writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                answer = self._next_answer()
                self._record(message, answer)
                if answer in ("aa", "ae", "ar"):
                    writer.writeblock(self._ack(message, answer.upper()).encode())
                elif answer == "wrongid":
                    writer.writeblock(self._ack(message, "AA", "NOTYOURS").encode())
                elif answer == "garbage":
                    writer.writeblock(b"HELLO this is not HL7")
                elif answer == "half":
                    writer.write(b"\x0b" + self._ack(message, "AA").encode()[:20])
                    await writer.drain()
                    writer.close()
                    return
                elif answer == "close":
                    writer.close()
                    return
                elif answer == "silent":
                    await asyncio.sleep(3600)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


async def serve(args: argparse.Namespace) -> None:
    ris = RIS(args.log, args.answers.split(","), args.reason)
    context = None
    if args.tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls[0], args.tls[1])
    server = await start_hl7_server(ris.handle, "127.0.0.1", args.port, ssl=context)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--answers", default="aa")
    parser.add_argument("--reason", default="")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = parser.parse_args()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
