"""What the child scripts that interrupt a SyncClient call with SIGINT end with (the unit
tests on a loopback server, the e2e tests on the suite): after the interrupted call, what
is still left on the client's loop, printed, then close()."""

AFTER_THE_INTERRUPT = """
async def left():
    me = asyncio.current_task()
    return [
        t for t in asyncio.all_tasks()
        if t is not me and not t.done()
        and t.get_coro().__qualname__ != "SyncClient._until_closed"
    ]

deadline = time.monotonic() + 5
while (tasks := asyncio.run_coroutine_threadsafe(left(), client._loop).result()) and (
    time.monotonic() < deadline
):
    time.sleep(0.01)
print("left", len(tasks), tasks, flush=True)
client.close()
print("closed", flush=True)
"""
