//! The ScyllaDB schema, as versioned migration files in `schemas/cql/`, compiled into the
//! binary so `conveyor ops migrate` needs nothing beside it.
//!
//! Also enough of a CQL DDL reader to check, without a node, that every file parses into
//! statements and that the statements the read store prepares name real columns and keys.

/// One migration file: `NNNN_name.cql`, applied in version order, each once.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The file's number, `NNNN`: 1 for the first file, counting up by one.
    pub version: u32,
    /// The file name without `.cql`, e.g. `0001_read_models`.
    pub name: &'static str,
    /// The file's CQL text, as written (comments included).
    pub text: &'static str,
}

/// Every migration, in the order they apply. A file is never edited once released: a change is
/// a new file.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_read_models",
        text: include_str!("../cql/0001_read_models.cql"),
    },
    Migration {
        version: 2,
        name: "0002_one_cell_description",
        text: include_str!("../cql/0002_one_cell_description.cql"),
    },
    Migration {
        version: 3,
        name: "0003_owner_ledger",
        text: include_str!("../cql/0003_owner_ledger.cql"),
    },
];

/// `ALTER TABLE table ADD column type`, the one schema change besides `CREATE … IF NOT EXISTS`
/// that migrations make. `None` for any other statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddColumn {
    /// The altered table's name.
    pub table: String,
    /// The added column's name.
    pub column: String,
    /// The added column's CQL type, as written (one word, e.g. `text`).
    pub ty: String,
}

impl AddColumn {
    /// Reads `ALTER TABLE table ADD column type` (keywords in any case, exactly those four
    /// words after `ALTER TABLE`, table and column names of ASCII letters, digits and `_`).
    /// `None` for any other statement.
    pub fn parse(statement: &str) -> Option<AddColumn> {
        let rest = strip_prefix_ci(statement.trim(), "ALTER TABLE ")?;
        let mut words = rest.split_whitespace();
        let table = words.next()?.to_owned();
        if !words.next()?.eq_ignore_ascii_case("ADD") {
            return None;
        }
        let (column, ty) = (words.next()?.to_owned(), words.next()?.to_owned());
        let plain = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        (words.next().is_none() && plain(&table) && plain(&column)).then_some(AddColumn {
            table,
            column,
            ty,
        })
    }
}

/// The tables the migrations leave: every `CREATE TABLE`, with the columns later files add.
pub fn final_tables() -> Result<Vec<TableDef>, DdlError> {
    let mut tables: Vec<TableDef> = Vec::new();
    for statement in MIGRATIONS.iter().flat_map(|m| m.statements()) {
        if let Some(add) = AddColumn::parse(&statement) {
            let table = tables
                .iter_mut()
                .find(|t| t.name == add.table)
                .ok_or(DdlError {
                    statement: statement.clone(),
                    reason: "ALTER of a table no migration created",
                })?;
            table.columns.push((add.column, add.ty));
        } else if strip_prefix_ci(&statement, "CREATE TABLE ").is_some() {
            tables.push(parse_create_table(&statement)?);
        }
    }
    Ok(tables)
}

impl Migration {
    /// The file's statements, without comments, in order.
    pub fn statements(&self) -> Vec<String> {
        split_statements(self.text)
    }
}

/// Splits CQL text at `;` outside quotes, dropping `--` and `//` comments and blank statements.
pub fn split_statements(text: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let mut quoted = false;
        let mut chars = line.char_indices().peekable();
        while let Some((_, c)) = chars.next() {
            match c {
                '\'' => {
                    quoted = !quoted;
                    current.push(c);
                }
                '-' | '/' if !quoted && chars.peek().map(|(_, n)| *n) == Some(c) => break,
                ';' if !quoted => {
                    let statement = current.split_whitespace().collect::<Vec<_>>().join(" ");
                    if !statement.is_empty() {
                        statements.push(statement);
                    }
                    current.clear();
                }
                _ => current.push(c),
            }
        }
        current.push('\n');
    }
    let rest = current.split_whitespace().collect::<Vec<_>>().join(" ");
    if !rest.is_empty() {
        statements.push(rest);
    }
    statements
}

/// A table as a `CREATE TABLE` statement defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDef {
    /// The table's name, without `IF NOT EXISTS`.
    pub name: String,
    /// `(name, type)`, in declaration order.
    pub columns: Vec<(String, String)>,
    /// The partition key's columns, in order (one column when the key is not composite).
    pub partition_key: Vec<String>,
    /// The clustering columns, in order; empty when the primary key is the partition key.
    pub clustering_key: Vec<String>,
}

impl TableDef {
    /// Whether the table has a column called `name` (exact, case-sensitive match).
    pub fn has_column(&self, name: &str) -> bool {
        self.columns.iter().any(|(c, _)| c == name)
    }
}

/// A CQL statement the DDL reader cannot read, or one that contradicts the migrations before
/// it (an `ALTER` of a table no migration created).
#[derive(Debug, thiserror::Error)]
#[error("cannot read CQL statement {statement:?}: {reason}")]
pub struct DdlError {
    /// The statement, as given to the reader.
    pub statement: String,
    /// What is wrong with it, e.g. `no PRIMARY KEY`.
    pub reason: &'static str,
}

/// Reads a `CREATE TABLE [IF NOT EXISTS] name (columns, PRIMARY KEY (...)) [WITH ...]`.
pub fn parse_create_table(statement: &str) -> Result<TableDef, DdlError> {
    let fail = |reason| DdlError {
        statement: statement.to_owned(),
        reason,
    };
    let rest = strip_prefix_ci(statement.trim(), "CREATE TABLE ")
        .ok_or_else(|| fail("not a CREATE TABLE"))?;
    let rest = strip_prefix_ci(rest.trim_start(), "IF NOT EXISTS ")
        .unwrap_or(rest)
        .trim_start();
    let open = rest.find('(').ok_or_else(|| fail("no column list"))?;
    let name = rest[..open].trim().to_owned();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(fail("bad table name"));
    }
    let body = enclosed(&rest[open..]).ok_or_else(|| fail("unbalanced parentheses"))?;
    let mut columns = Vec::new();
    let mut primary_key = None;
    for item in split_top_level(body) {
        if let Some(key) = strip_prefix_ci(&item, "PRIMARY KEY") {
            primary_key = Some(key.trim().to_owned());
            continue;
        }
        let mut words = item.split_whitespace();
        let (Some(column), Some(ty)) = (words.next(), words.next()) else {
            return Err(fail("a column without a type"));
        };
        let tail: Vec<&str> = words.collect();
        if tail
            .iter()
            .map(|w| w.to_ascii_uppercase())
            .eq(["PRIMARY", "KEY"])
        {
            primary_key = Some(format!("({column})"));
        } else if !tail.is_empty()
            && !matches!(tail.as_slice(), [w] if w.eq_ignore_ascii_case("STATIC"))
        {
            return Err(fail("unexpected words after a column type"));
        }
        columns.push((column.to_owned(), ty.to_owned()));
    }
    let key = primary_key.ok_or_else(|| fail("no PRIMARY KEY"))?;
    let key = enclosed(&key).ok_or_else(|| fail("bad PRIMARY KEY"))?;
    let mut parts = split_top_level(key).into_iter();
    let first = parts.next().ok_or_else(|| fail("empty PRIMARY KEY"))?;
    let partition_key = match enclosed(&first) {
        Some(inner) => split_top_level(inner),
        None => vec![first],
    };
    let clustering_key: Vec<String> = parts.collect();
    let table = TableDef {
        name,
        columns,
        partition_key,
        clustering_key,
    };
    for key in table.partition_key.iter().chain(&table.clustering_key) {
        if !table.has_column(key) {
            return Err(fail("a key column that is not declared"));
        }
    }
    Ok(table)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// The text inside the parentheses `s` starts with, if they balance.
fn enclosed(s: &str) -> Option<&str> {
    let s = s.trim_start();
    if !s.starts_with('(') {
        return None;
    }
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&s[1..i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Splits at commas outside `()` and `<>`, trimming each part.
fn split_top_level(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' | '<' => depth += 1,
            ')' | '>' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(s[start..i].trim().to_owned());
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = s[start..].trim();
    if !last.is_empty() {
        parts.push(last.to_owned());
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_file_is_listed_in_order_and_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cql");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".cql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{}.cql", m.name))
            .collect();
        assert_eq!(files, listed, "schemas/cql/ and MIGRATIONS must agree");
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "versions count up from 1");
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
            let statements = m.statements();
            assert!(!statements.is_empty(), "{} has statements", m.name);
            for s in statements {
                assert!(
                    s.starts_with("CREATE ") || AddColumn::parse(&s).is_some(),
                    "{}: only CREATE … IF NOT EXISTS and ALTER TABLE … ADD (which `ops migrate` \
                     skips when the column exists) belong in a migration: {s}",
                    m.name
                );
                assert!(
                    !s.starts_with("CREATE ") || s.contains(" IF NOT EXISTS "),
                    "{}: CREATE must be IF NOT EXISTS so a rerun is harmless: {s}",
                    m.name
                );
                if s.starts_with("CREATE TABLE") {
                    let table = parse_create_table(&s).unwrap();
                    assert!(
                        s.contains("compaction"),
                        "{} names its compaction",
                        table.name
                    );
                }
            }
        }
    }

    #[test]
    fn the_tables_have_the_keys_their_queries_need() {
        let tables = final_tables().unwrap();
        let get = |name: &str| tables.iter().find(|t| t.name == name).unwrap();
        assert_eq!(get("media_by_id").partition_key, ["id"]);
        let by_owner = get("media_by_owner");
        assert_eq!(by_owner.partition_key, ["owner", "bucket"]);
        assert_eq!(by_owner.clustering_key, ["created_at", "id"]);
        assert_eq!(get("owner_stats").partition_key, ["owner", "bucket"]);
        assert_eq!(get("owner_buckets").clustering_key, ["bucket"]);
        assert!(get("media_by_id").has_column("described"), "added by 0002");
        assert!(by_owner.has_column("described"), "added by 0002");
        let ledger = get("owner_ledger");
        assert_eq!(
            ledger.partition_key,
            ["owner"],
            "one partition per owner, for its CAS"
        );
        assert_eq!(ledger.clustering_key, ["kind", "bucket", "id"]);
        let timeline = get("timeline");
        assert_eq!(timeline.partition_key, ["owner", "bucket", "chunk"]);
        assert_eq!(timeline.clustering_key, ["created_at", "id"]);
        assert!(get("media_by_id").has_column("chunk"), "added by 0003");
    }

    #[test]
    fn alter_add_reads_table_column_and_type_only() {
        assert_eq!(
            AddColumn::parse("ALTER TABLE media_by_id ADD described text"),
            Some(AddColumn {
                table: "media_by_id".into(),
                column: "described".into(),
                ty: "text".into()
            })
        );
        for other in [
            "ALTER TABLE t DROP c",
            "ALTER TABLE t ADD c text WITH x",
            "ALTER TABLE t; ADD c text",
            "CREATE TABLE t (c int PRIMARY KEY)",
        ] {
            assert_eq!(AddColumn::parse(other), None, "{other}");
        }
    }

    #[test]
    fn splitting_ignores_comments_and_quoted_semicolons() {
        let parts = split_statements(
            "-- a; comment\nCREATE TABLE a (x int PRIMARY KEY) WITH c = {'k': 'v;w'}; // x\n\n;",
        );
        assert_eq!(
            parts,
            ["CREATE TABLE a (x int PRIMARY KEY) WITH c = {'k': 'v;w'}"]
        );
        let t = parse_create_table(&parts[0]).unwrap();
        assert_eq!(
            (t.partition_key, t.clustering_key),
            (vec!["x".to_owned()], vec![])
        );
        assert!(parse_create_table("CREATE TABLE b (x int, PRIMARY KEY (y))").is_err());
        assert!(parse_create_table("CREATE TABLE b (x int").is_err());
    }
}
