"""Drives the vmm's QMP socket with the qemu.qmp library (QEMU's own
Python client): capabilities, query-status, stop, cont, then
system_powerdown and the POWERDOWN and SHUTDOWN events (the test guest
powers off when it sees the ACPI power button). Prints one line per fact;
exits non-zero on any surprise.

Usage: qmp_client.py SOCKET
"""

import asyncio
import sys

from qemu.qmp import QMPClient


async def main(socket_path: str) -> None:
    client = QMPClient("vmm-test")
    await client.connect(socket_path)  # reads the greeting, negotiates
    with client.listener() as listener:
        status = await client.execute("query-status")
        print("status", status["status"])
        await client.execute("stop")
        status = await client.execute("query-status")
        print("status", status["status"])
        await client.execute("cont")
        status = await client.execute("query-status")
        print("status", status["status"], "again")
        version = await client.execute("query-version")
        print("package", version["package"])
        await client.execute("system_powerdown")
        async for event in listener:
            if event["event"] == "POWERDOWN":
                print("event POWERDOWN")
            if event["event"] == "SHUTDOWN":
                print("event SHUTDOWN", event["data"]["reason"])
                break
    await client.disconnect()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1]), timeout=60))
