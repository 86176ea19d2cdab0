#!/usr/bin/env python3
"""The rush's shape in PostgreSQL, run with pgbench, beside prenota's rush in the same run.

Every citizen searches its site for 20 slots with free places (in start order), then
books one of them with one statement that takes a place only while one is free and
records the booking (primary key, a unique request id, one booking per citizen and
service). Synchronous commit and fsync stay on: every booking is durable when answered,
as in prenota. Then prenota's own rush of the same shape (`prenota-loadtest --spawn rush
--demand-ratio 1`: every citizen searches, then books). Both report the server's CPU per
citizen, read from /proc (PostgreSQL: the postmaster and every backend, including the
ones that have exited; prenota: its server threads), so the load generators' CPU does
not count.

Not part of CI. Needs PostgreSQL's server and pgbench (Debian: `apt-get install -y
postgresql`). The server runs from a temp dir, on a Unix socket only (no TCP port), and
is stopped and deleted at the end. Run as root, it runs PostgreSQL as user `postgres`.

    python3 loadtest/postgres_baseline.py --citizens 200000
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SITES = 4
DAYS = 5
SLOTS_PER_DAY = 72  # 08:00-20:00 in 10-minute slots, as in prenota's rush
USER_HZ = os.sysconf("SC_CLK_TCK")

SCHEMA = """
CREATE TABLE slots (
    id bigint PRIMARY KEY,
    site int NOT NULL,
    service text NOT NULL,
    starts_at timestamptz NOT NULL,
    capacity int NOT NULL,
    taken int NOT NULL DEFAULT 0 CHECK (taken <= capacity)
);
CREATE INDEX slots_by_site ON slots (site, service, starts_at);
CREATE TABLE bookings (
    id bigserial PRIMARY KEY,
    request_id uuid NOT NULL UNIQUE,
    citizen bigint NOT NULL,
    service text NOT NULL,
    slot_id bigint NOT NULL REFERENCES slots (id),
    created_at timestamptz NOT NULL,
    UNIQUE (citizen, service)
);
"""

# One citizen: search its site for 20 slots with a free place, then book one of them
# (a random one of those found, as citizens click different times) in one statement.
# A slot filled in between books nothing (prenota's SLOT_FULL): the citizen searches
# and tries again, up to ROUNDS times in all. (prenota's rush is more persistent: it
# tries every slot a search found, for up to 1,000 searches; that only adds work on
# prenota's side.)
ROUNDS = 3
SEARCH_AND_BOOK = r"""
SELECT string_agg(id::text, ',') AS ids, count(*) AS found FROM (
  SELECT id, starts_at, capacity - taken AS free FROM slots
  WHERE site = :site AND service = 'vaccination' AND taken < capacity
  ORDER BY starts_at LIMIT 20) AS free_slots \gset
\set pick random(1, greatest(:found, 1))
WITH place AS (
  UPDATE slots SET taken = taken + 1
  WHERE id = (string_to_array(:ids, ',')::bigint[])[:pick] AND taken < capacity
  RETURNING id),
booking AS (
  INSERT INTO bookings (request_id, citizen, service, slot_id, created_at)
  SELECT gen_random_uuid(), :citizen, 'vaccination', id, now() FROM place
  RETURNING 1)
SELECT count(*) AS booked FROM booking \gset
"""


def rush_sql():
    """pgbench has no loops: the retries are unrolled as nested `\\if`s."""
    script = f"\\set site random(1, {SITES})\n\\set citizen random(1, 9000000000000000)\n"
    script += SEARCH_AND_BOOK
    for _ in range(ROUNDS - 1):
        script += "\\if :booked = 0 and :found > 0\n" + SEARCH_AND_BOOK
    return script + "\\endif\n" * (ROUNDS - 1)


def run(command, **kwargs):
    return subprocess.run(command, check=True, **kwargs)


def pg_bin():
    def version(path):
        major = path.split("/")[-2]
        return int(major) if major.isdigit() else 0

    for path in [os.environ.get("PG_BIN", "")] + sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True
    ):
        if path and os.path.exists(os.path.join(path, "postgres")):
            return path
    sys.exit("no PostgreSQL server found: apt-get install -y postgresql (or set PG_BIN)")


def as_postgres(command):
    """PostgreSQL refuses to run as root: run it as the `postgres` user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + command
    return command


def cpu_seconds(pid):
    """utime + stime of a process, plus its reaped children (cutime + cstime)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the command: state is field 3; utime 14, stime 15, cutime 16, cstime 17.
    own = int(fields[14 - 3]) + int(fields[15 - 3])
    reaped = int(fields[16 - 3]) + int(fields[17 - 3])
    return own, reaped


def server_cpu(postmaster):
    """The postmaster's own and reaped CPU plus every live child's own CPU, in seconds."""
    own, reaped = cpu_seconds(postmaster)
    total = own + reaped
    for task in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(task) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if int(fields[4 - 3]) == postmaster:
                child_own, _ = cpu_seconds(int(task.split("/")[2]))
                total += child_own
        except (OSError, ValueError, IndexError):
            continue  # a process that ended meanwhile
    return total / USER_HZ


def start_postgres(bin_dir, work):
    data, sockets = os.path.join(work, "data"), os.path.join(work, "sockets")
    os.makedirs(sockets)
    if os.geteuid() == 0:
        shutil.chown(work, "postgres")
        shutil.chown(sockets, "postgres")
    run(as_postgres([f"{bin_dir}/initdb", "-D", data, "-U", "postgres", "--auth=trust"]),
        stdout=subprocess.DEVNULL)
    options = (
        f"-c listen_addresses='' -k {sockets} -c fsync=on -c synchronous_commit=on "
        "-c shared_buffers=512MB -c max_connections=200 -c max_wal_size=4GB"
    )
    run(as_postgres([f"{bin_dir}/pg_ctl", "-D", data, "-w", "-l",
                     os.path.join(work, "server.log"), "-o", options, "start"]),
        stdout=subprocess.DEVNULL)
    with open(os.path.join(data, "postmaster.pid")) as pid:
        return data, sockets, int(pid.readline())


def psql(bin_dir, sockets, sql):
    return run([f"{bin_dir}/psql", "-h", sockets, "-U", "postgres", "-q", "-t", "-A",
                "-v", "ON_ERROR_STOP=1", "-c", sql], stdout=subprocess.PIPE, text=True).stdout


def publish(bin_dir, sockets, citizens):
    slots = SITES * DAYS * SLOTS_PER_DAY
    capacity = -(-citizens // slots)  # every citizen has a place, as with --demand-ratio 1
    psql(bin_dir, sockets, SCHEMA)
    psql(bin_dir, sockets, f"""
        INSERT INTO slots (id, site, service, starts_at, capacity)
        SELECT site * 100000 + day * 1000 + n, site, 'vaccination',
               date '2027-01-04' + day + time '08:00' + n * interval '10 minutes', {capacity}
        FROM generate_series(1, {SITES}) site, generate_series(0, {DAYS - 1}) day,
             generate_series(0, {SLOTS_PER_DAY - 1}) n;""")
    psql(bin_dir, sockets, "VACUUM ANALYZE")
    return slots * capacity


def postgres_rush(citizens, clients):
    bin_dir = pg_bin()
    work = tempfile.mkdtemp(prefix="prenota-pg-")
    data = None
    try:
        data, sockets, postmaster = start_postgres(bin_dir, work)
        places = publish(bin_dir, sockets, citizens)
        script = os.path.join(work, "rush.sql")
        with open(script, "w") as f:
            f.write(rush_sql())
        before, started = server_cpu(postmaster), time.monotonic()
        pgbench = subprocess.run([f"{bin_dir}/pgbench", "-h", sockets, "-U", "postgres",
                                  "-n", "-M", "prepared", "-c", str(clients), "-j", "2",
                                  "-t", str(citizens // clients), "-f", script, "postgres"],
                                 capture_output=True, text=True)
        elapsed = time.monotonic() - started
        time.sleep(0.5)  # let exited backends be reaped into the postmaster's times
        cpu = server_cpu(postmaster) - before
        done = (citizens // clients) * clients
        booked, over = psql(bin_dir, sockets, """
            SELECT (SELECT count(*) FROM bookings),
                   (SELECT count(*) FROM slots s WHERE taken > capacity
                    OR taken <> (SELECT count(*) FROM bookings b WHERE b.slot_id = s.id));
        """).strip().split("|")
        if int(over) != 0:
            sys.exit(f"PostgreSQL baseline: {over} slots whose counter disagrees with bookings")
        if pgbench.returncode != 0:
            sys.exit(f"pgbench failed (exit {pgbench.returncode}):\n{pgbench.stderr}")
        failed = [line for line in pgbench.stdout.splitlines()
                  if ("failed" in line or "aborted" in line) and not line.endswith(": 0 (0.000%)")]
        return {
            "citizens": done,
            "places": places,
            "booked": int(booked),
            "elapsed_s": elapsed,
            "citizens_per_s": done / elapsed,
            "server_cpu_s": cpu,
            "server_cpu_us_per_citizen": cpu * 1e6 / done,
            "pgbench": failed,
        }
    finally:
        if data:
            subprocess.run(as_postgres([f"{bin_dir}/pg_ctl", "-D", data, "-m", "fast", "stop"]),
                           stdout=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


def prenota_rush(citizens, in_flight):
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        loadtest = subprocess.run(["cargo", "run", "--release", "-q", "-p", "loadtest", "--",
                                   "--spawn", "--in-flight", str(in_flight), "--json",
                                   report.name, "rush", "--citizens", str(citizens),
                                   "--demand-ratio", "1"], capture_output=True, text=True)
        if loadtest.returncode != 0:  # exit 1: an invariant broke; it says which
            sys.exit(f"prenota's rush failed (exit {loadtest.returncode}):\n"
                     f"{loadtest.stdout[-4000:]}\n{loadtest.stderr[-4000:]}")
        with open(report.name) as f:
            result = json.load(f)
    phase, cpu = result["rush"], result["rush"]["server_cpu_s"]
    return {
        "citizens": citizens,
        "booked": result["bookings"],
        "no_op_server_cpu_us": result["ceiling"]["server_cpu_us_per_request"],
        "requests": phase["requests"],
        "elapsed_s": phase["elapsed_s"],
        "citizens_per_s": citizens / phase["elapsed_s"],
        "server_cpu_s": cpu,
        "server_cpu_us_per_citizen": cpu * 1e6 / citizens,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--citizens", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=64,
                        help="pgbench clients, and prenota's requests in flight")
    parser.add_argument("--json", help="also write both results to this file")
    parser.add_argument("--postgres-only", action="store_true",
                        help="run the PostgreSQL side only and print its result")
    args = parser.parse_args()
    print(f"PostgreSQL: {args.citizens} citizens, {args.clients} pgbench clients ...",
          flush=True)
    postgres = postgres_rush(args.citizens, args.clients)
    if args.postgres_only:
        print(json.dumps(postgres, indent=2))
        return
    print(f"prenota: {args.citizens} citizens, {args.clients} in flight ...", flush=True)
    prenota = prenota_rush(args.citizens, args.clients)
    print("\n| server | citizens/s | server CPU per citizen | bookings |")
    print("| --- | --- | --- | --- |")
    print(f"| PostgreSQL (pgbench) | {postgres['citizens_per_s']:,.0f} | "
          f"{postgres['server_cpu_us_per_citizen']:.0f} µs | {postgres['booked']:,} |")
    print(f"| prenota | {prenota['citizens_per_s']:,.0f} | "
          f"{prenota['server_cpu_us_per_citizen']:.0f} µs | {prenota['booked']:,} |")
    print(f"\nprenota's no-op (health check) in the same run: "
          f"{prenota['no_op_server_cpu_us']:.1f} µs of server CPU per request")
    ratio = postgres["server_cpu_us_per_citizen"] / prenota["server_cpu_us_per_citizen"]
    print(f"\nprenota uses {ratio:.1f}x less server CPU per citizen")
    if postgres["pgbench"]:
        print("pgbench reported:", *postgres["pgbench"], sep="\n  ")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"postgres": postgres, "prenota": prenota, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
