package store

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"

	sqlite3 "github.com/mattn/go-sqlite3"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// nixSchema is Nix 2.8's src/libstore/schema.sql: the database must be
// exactly Nix's so that real Nix can open it.
const nixSchema = `
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);

create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

-- Paths can refer to themselves, causing a tuple (N, N) in the Refs
-- table.  This causes a deletion of the corresponding row in
-- ValidPaths to cause a foreign key constraint violation (due to ` + "`" + `on
-- delete restrict' on the ` + "`" + `reference' column).  Therefore, explicitly
-- get rid of self-references.
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
`

// driverName is mattn/go-sqlite3 with the per-connection settings Nix's
// SQLite wrapper and openDB apply (foreign keys, a one-hour busy timeout,
// synchronous=normal, and a 40000-page WAL auto-checkpoint interval).
const driverName = "sqlite3-nixyard"

var registerDriver sync.Once

func dbDriver() string {
	registerDriver.Do(func() {
		sql.Register(driverName, &sqlite3.SQLiteDriver{
			ConnectHook: func(c *sqlite3.SQLiteConn) error {
				for _, p := range []string{
					"pragma foreign_keys = 1",
					"pragma busy_timeout = 3600000",
					"pragma synchronous = normal",
					"pragma wal_autocheckpoint = 40000",
				} {
					if _, err := c.Exec(p, nil); err != nil {
						return fmt.Errorf("%s: %w", p, err)
					}
				}
				return nil
			},
		})
	})
	return driverName
}

// database is the SQLite database: one writer connection and a pool of
// readers (WAL lets readers run beside the writer and beside other
// processes).
type database struct {
	path string
	w    *sql.DB // exactly one connection; transactions are BEGIN IMMEDIATE
	r    *sql.DB

	// Prepared statements on the reader pool.
	qPathInfo, qReferrers, qValid, qAll, qHashPart, qDerivers, qDrvOutputs *sql.Stmt

	// Prepared statements on the writer connection, for transactions to
	// use through tx.StmtContext: go-sqlite3 keeps no statement cache,
	// and compiling a statement costs about as much as running it.
	wPathID, wInsertPath, wOldPath, wUpdatePath, wInsertDrvOutput, wInsertRef, wReferrers, wInvalidate *sql.Stmt

	// guard is a connection of its own that only runs "pragma
	// data_version"; see dataVersion. It is used under guardMu.
	guardMu   sync.Mutex
	guard     driver.Conn
	guardStmt driver.Stmt
	guardDest []driver.Value

	// onCommit runs after every transaction of the writer (see write).
	onCommit func(c commit)

	// writerVersion is data_version as last read on the writer connection
	// (-1: not yet, and then the next commit counts as foreign), which only
	// other processes' commits change. Used by write, while it holds that
	// connection.
	writerVersion int64
}

// commit tells the path info cache (onCommit) what a transaction of ours
// may have changed.
type commit struct {
	// touched names every path whose ValidPaths row, or references, the
	// transaction may have added, changed or deleted.
	touched []storepath.Path
	// external: another process committed too, since our previous write or
	// in the moment after this one; everything may have changed.
	external bool
	// guardVersion is the guard connection's data_version after the
	// commit, which counts it (and, if !external, nothing of others').
	guardVersion int64
}

// write runs fn in a transaction of the writer connection and commits it.
// Every write of this package goes through it, so that onCommit (the path
// info cache's invalidation) follows every commit of ours. touched names
// every path whose ValidPaths row, or references, fn may add, change or
// delete.
//
// Around the transaction it reads data_version on the writer connection,
// where only other processes' commits change it: at its start (under the
// write lock, so nothing else can commit until ours is done) and after
// the commit, after reading the guard's. An external commit that the
// guard's value takes in is therefore always seen by the second reading.
func (d *database) write(ctx context.Context, touched []storepath.Path, fn func(tx *sql.Tx) error) error {
	conn, err := d.w.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	before, verr := writerDataVersion(tx)
	if err := fn(tx); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		// Possibly committed after all: treat as a change of anything.
		d.committed(commit{external: true, guardVersion: -1})
		return err
	}
	c := commit{touched: touched}
	d.guardMu.Lock()
	c.guardVersion, err = d.dataVersion()
	d.guardMu.Unlock()
	after, aerr := writerDataVersion(conn)
	c.external = err != nil || verr != nil || aerr != nil ||
		d.writerVersion < 0 || before != d.writerVersion || after != before
	if err != nil {
		c.guardVersion = -1
	}
	d.writerVersion = after
	if aerr != nil {
		d.writerVersion = -1
	}
	d.committed(c)
	return nil
}

func (d *database) committed(c commit) {
	if d.onCommit != nil {
		d.onCommit(c)
	}
}

// writerDataVersion reads data_version on the writer connection (q is the
// connection or a transaction of it). Without a cancellable context:
// go-sqlite3 would step the statement in a goroutine of its own.
func writerDataVersion(q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}) (int64, error) {
	var v int64
	if err := q.QueryRowContext(context.Background(), "pragma data_version").Scan(&v); err != nil {
		return 0, fmt.Errorf("pragma data_version: %w", err)
	}
	return v, nil
}

// openDatabase opens db/db.sqlite, creating it and db/schema as Nix does
// for a new store. Schemas other than 10 are refused.
func openDatabase(ctx context.Context, dbDir string, log *slog.Logger) (*database, error) {
	if err := checkWritable(dbDir); err != nil {
		return nil, err
	}
	schemaPath := filepath.Join(dbDir, "schema")
	cur, err := readSchema(schemaPath)
	if err != nil {
		return nil, err
	}
	if cur != 0 && cur != schemaVersion {
		return nil, fmt.Errorf("store: %s: current Nix store schema is version %d, but only version %d is supported", schemaPath, cur, schemaVersion)
	}
	d := &database{path: filepath.Join(dbDir, "db.sqlite"), writerVersion: -1}
	mode := "rw"
	if cur == 0 {
		mode = "rwc"
	}
	d.w, err = sql.Open(dbDriver(), sqliteURI(d.path)+"?mode="+mode+"&_txlock=immediate")
	if err != nil {
		return nil, fmt.Errorf("store: opening %s: %w", d.path, err)
	}
	d.w.SetMaxOpenConns(1)
	d.w.SetMaxIdleConns(1)
	d.w.SetConnMaxLifetime(0)
	if err := d.setup(ctx, cur == 0); err != nil {
		d.w.Close()
		return nil, err
	}
	if cur == 0 {
		if err := writeFileSync(schemaPath, []byte(strconv.Itoa(schemaVersion)), 0o666); err != nil {
			d.w.Close()
			return nil, err
		}
		log.Info("created Nix database", "path", d.path)
	}
	d.r, err = sql.Open(dbDriver(), sqliteURI(d.path)+"?mode=rw&_txlock=deferred")
	if err != nil {
		d.w.Close()
		return nil, fmt.Errorf("store: opening %s: %w", d.path, err)
	}
	n := 4 * runtime.GOMAXPROCS(0)
	d.r.SetMaxOpenConns(n)
	d.r.SetMaxIdleConns(n)
	if err := d.prepare(ctx); err != nil {
		d.close()
		return nil, err
	}
	if err := d.openGuard(); err != nil {
		d.close()
		return nil, err
	}
	return d, nil
}

// openGuard opens the connection that watches for commits: a driver
// connection used directly (not through database/sql, whose per-query
// bookkeeping would cost more than the pragma itself).
func (d *database) openGuard() error {
	c, err := d.r.Driver().Open(sqliteURI(d.path) + "?mode=rw")
	if err != nil {
		return fmt.Errorf("store: opening %s: %w", d.path, err)
	}
	st, err := c.Prepare("pragma data_version")
	if err != nil {
		c.Close()
		return fmt.Errorf("store: %s: preparing pragma data_version: %w", d.path, err)
	}
	d.guard, d.guardStmt, d.guardDest = c, st, make([]driver.Value, 1)
	return nil
}

// dataVersion returns SQLite's data_version as seen by the guard
// connection. Each call runs the pragma in a transaction of its own, so it
// reads the newest state of the WAL: the value differs from the previous
// call's whenever any other connection — this process's writer, or another
// process such as real Nix — committed in between (SQLite documents this
// for "pragma data_version"; values are only comparable on one connection,
// hence one dedicated connection). Called with guardMu held.
func (d *database) dataVersion() (int64, error) {
	// The context-free (deprecated) Query on purpose: with a context,
	// go-sqlite3 steps the statement in a new goroutine.
	rows, err := d.guardStmt.Query(nil)
	if err != nil {
		return 0, fmt.Errorf("store: %s: pragma data_version: %w", d.path, err)
	}
	err = rows.Next(d.guardDest)
	if cerr := rows.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, fmt.Errorf("store: %s: pragma data_version: %w", d.path, err)
	}
	v, ok := d.guardDest[0].(int64)
	if !ok {
		return 0, fmt.Errorf("store: %s: pragma data_version returned %T", d.path, d.guardDest[0])
	}
	return v, nil
}

func checkWritable(dir string) error {
	f, err := os.CreateTemp(dir, ".writable-")
	if err != nil {
		return fmt.Errorf("store: Nix database directory %s is not writable: %w", dir, err)
	}
	f.Close()
	return os.Remove(f.Name())
}

// readSchema reads db/schema; 0 means a new store. The file holds a small
// decimal number; more than 32 bytes cannot be one.
func readSchema(path string) (int, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("store: reading %s: %w", path, err)
	}
	if len(data) > 32 {
		return 0, fmt.Errorf("store: %s: %d bytes is too long for a schema version", path, len(data))
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		return 0, fmt.Errorf("store: %s: bad schema version: %w", path, err)
	}
	return v, nil
}

// setup sets the journal mode as Nix's openDB does and creates the schema.
func (d *database) setup(ctx context.Context, create bool) error {
	var mode string
	if err := d.w.QueryRowContext(ctx, "pragma main.journal_mode").Scan(&mode); err != nil {
		return fmt.Errorf("store: %s: querying journal mode: %w", d.path, err)
	}
	if mode != "wal" {
		if err := d.w.QueryRowContext(ctx, "pragma main.journal_mode = wal").Scan(&mode); err != nil {
			return fmt.Errorf("store: %s: setting journal mode: %w", d.path, err)
		}
	}
	if create {
		if _, err := d.w.ExecContext(ctx, nixSchema); err != nil {
			return fmt.Errorf("store: %s: creating schema: %w", d.path, err)
		}
	}
	return nil
}

func (d *database) prepare(ctx context.Context) error {
	for _, s := range []struct {
		dst **sql.Stmt
		sql string
	}{
		// One statement and one row per path: the references come
		// space-separated (store paths contain no spaces).
		{&d.qPathInfo, "select hash, registrationTime, deriver, narSize, ultimate, sigs, ca, (select group_concat(v.path, ' ') from Refs r join ValidPaths v on r.reference = v.id where r.referrer = p.id) from ValidPaths p where path = ?"},
		{&d.qValid, "select 1 from ValidPaths where path = ?"},
		{&d.qReferrers, "select path from Refs join ValidPaths on referrer = id where reference = (select id from ValidPaths where path = ?)"},
		{&d.qAll, "select path from ValidPaths"},
		{&d.qHashPart, "select path from ValidPaths where path >= ? limit 1"},
		{&d.qDerivers, "select v.path from DerivationOutputs d join ValidPaths v on d.drv = v.id where d.path = ?"},
		{&d.qDrvOutputs, "select d.id, d.path from DerivationOutputs d join ValidPaths v on d.drv = v.id where v.path = ?"},
	} {
		st, err := d.r.PrepareContext(ctx, s.sql)
		if err != nil {
			return fmt.Errorf("store: %s: preparing %q: %w", d.path, s.sql, err)
		}
		*s.dst = st
	}
	for _, s := range []struct {
		dst **sql.Stmt
		sql string
	}{
		{&d.wPathID, "select id from ValidPaths where path = ?"},
		{&d.wInsertPath, "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca) values (?, ?, ?, ?, ?, ?, ?, ?)"},
		{&d.wOldPath, "select hash, sigs, ultimate from ValidPaths where id = ?"},
		{&d.wUpdatePath, "update ValidPaths set narSize = ?, hash = ?, ultimate = ?, sigs = ?, ca = ? where path = ?"},
		{&d.wInsertDrvOutput, "insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?)"},
		{&d.wInsertRef, "insert or replace into Refs (referrer, reference) values (?, ?)"},
		{&d.wReferrers, "select path from Refs join ValidPaths on referrer = id where reference = (select id from ValidPaths where path = ?)"},
		{&d.wInvalidate, "delete from ValidPaths where path = ?"},
	} {
		// The writer pool's one connection is idle here: the statement
		// is prepared on it, and transactions reuse it.
		st, err := d.w.PrepareContext(ctx, s.sql)
		if err != nil {
			return fmt.Errorf("store: %s: preparing %q: %w", d.path, s.sql, err)
		}
		*s.dst = st
	}
	return nil
}

// stmts lists the prepared statements, of the readers and the writer.
func (d *database) stmts() []*sql.Stmt {
	return []*sql.Stmt{d.qPathInfo, d.qReferrers, d.qValid, d.qAll, d.qHashPart, d.qDerivers, d.qDrvOutputs,
		d.wPathID, d.wInsertPath, d.wOldPath, d.wUpdatePath, d.wInsertDrvOutput, d.wInsertRef, d.wReferrers, d.wInvalidate}
}

func (d *database) close() error {
	if d == nil {
		return nil
	}
	var errs []error
	for _, st := range d.stmts() {
		if st != nil {
			errs = append(errs, st.Close())
		}
	}
	if d.guardStmt != nil {
		errs = append(errs, d.guardStmt.Close())
	}
	if d.guard != nil {
		errs = append(errs, d.guard.Close())
	}
	if d.r != nil {
		errs = append(errs, d.r.Close())
	}
	if d.w != nil {
		errs = append(errs, d.w.Close())
	}
	return errors.Join(errs...)
}

// writeFileSync writes a file durably (write, fsync, close), replacing it
// atomically through a temporary name.
func writeFileSync(path string, data []byte, perm os.FileMode) error {
	tmp := fmt.Sprintf("%s.tmp.%d", path, os.Getpid())
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// sqliteURI is the file: URI of the database at path, with the characters
// that mean something in a URI ('?', '#', '%', ...) escaped: a store under
// a directory whose name has them must not open a database elsewhere.
func sqliteURI(path string) string {
	return "file:" + (&url.URL{Path: path}).EscapedPath()
}
