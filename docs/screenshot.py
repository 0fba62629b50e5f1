"""Screenshots of the MLflow UI for the README, taken with headless Chromium over the DevTools protocol.

    apt-get install chromium && pip install websocket-client
    mlflow ui --backend-store-uri sqlite:///$PWD/kfp-grpo-runs/mlflow.db --port 5000 &
    python docs/screenshot.py "http://127.0.0.1:5000/#/experiments/1/runs" docs/mlflow-runs.png 30 [JS ...]

Opens URL at 1600×1000, waits SECONDS in real time (the UI loads its charts lazily), runs each JS
expression (e.g. a click that closes a side panel or expands the parent run; 8 s after each) and
writes a PNG.
"""
import base64, json, subprocess, sys, time, urllib.request
import websocket

url, out = sys.argv[1], sys.argv[2]
proc = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--hide-scrollbars", "--window-size=1600,1000", "--remote-debugging-port=9333", "about:blank"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    for _ in range(60):
        try:
            tabs = json.load(urllib.request.urlopen("http://127.0.0.1:9333/json"))
            break
        except Exception:
            time.sleep(0.5)
    ws = websocket.create_connection([t for t in tabs if t["type"] == "page"][0]["webSocketDebuggerUrl"], timeout=60)
    n = [0]
    def call(method, **params):
        n[0] += 1
        ws.send(json.dumps({"id": n[0], "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv())
            if msg.get("id") == n[0]:
                return msg.get("result", {})
    call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)
    call("Page.enable")
    call("Page.navigate", url=url)
    time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 25)
    for js in sys.argv[4:]:
        call("Runtime.evaluate", expression=js)
        time.sleep(8)
    data = call("Page.captureScreenshot", format="png")["data"]
    open(out, "wb").write(base64.b64decode(data))
finally:
    proc.kill()
