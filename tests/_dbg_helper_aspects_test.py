import json, csv
from mavl_cli.demo import descriptions_path
def test_dbg(cli, chain):
    ph = chain["phantoms"]
    img = str(ph.root / next(csv.DictReader(open(ph.splits["test"])))["Path"])
    for extra in ([], ["--explain"]):
        r = cli(["--debug", "predict", img, "--model", chain["dir"] / "tuned.st", "--descriptions", descriptions_path("extra.json"), "--json", *extra])
        print(extra, r.exit_code, r.stderr[-3000:])
