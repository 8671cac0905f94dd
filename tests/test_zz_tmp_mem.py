import gc, tracemalloc
from tests.test_faults_load import *
from tests.fault_checks import Faults

async def test_mem(faults: Faults) -> None:
    h = await faults.start(backend={"max_retries": MAX_RETRIES, "max_connections": POOL})
    h.fake.record = False
    faults.caplog.set_level(logging.WARNING)
    script = Script()
    h.fake.handler = script
    snaps = []
    for number in range(8):
        outcomes = await round_of_streams(h, f"r{number}")
        await faults.settled(h, timeout=15)
        h.echo.calls.clear(); script.answered.clear(); script.tool_answer.clear()
        for o in outcomes: o.events.clear()
        del outcomes
        gc.collect()
        if number == 0:
            tracemalloc.start(4)
        else:
            snaps.append(tracemalloc.take_snapshot())
            print("MEM", tracemalloc.get_traced_memory()[0])
    print("=== diff")
    for s in snaps[-1].compare_to(snaps[1], "traceback")[:8]:
        print(s)
        for line in s.traceback.format():
            print("   ", line)
    tracemalloc.stop()
