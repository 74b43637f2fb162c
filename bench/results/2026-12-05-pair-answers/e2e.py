"""The real app (default options, no PHI3_LORA_COMPILED_PAIR) answering Compare through gradio_client."""
import re, sys, time
from gradio_client import Client
url, run_id, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = Client(url, verbose=False)
first = None
for i in range(n):
    t = time.time()
    base_chat, tuned_chat, _, status, _ = c.predict("Why is the sky blue?", run_id, 0.0, 0.9, 128, 0, [], [],
                                                    api_name="/compare")
    dt = time.time() - t
    b, tu = (x[-1]["content"] for x in (base_chat, tuned_chat))
    b, tu = (x if isinstance(x, str) else x[0]["text"] for x in (b, tu))
    first = first or (b, tu)
    print(f"[{i}] {dt:.2f} s same={ (b, tu) == first }; status: {re.sub('<[^>]+>', '', str(status))[-260:]}", flush=True)
    time.sleep(2)
