// The queries and row codecs that the SQLite and PostgreSQL stores share, written once and
// compiled into each (`include!`d by `sql.rs` and `postgres.rs`). The including module
// defines `Db` (the sqlx database), `Conn` and `DbRow` (its connection and row), `Store` (the
// store type, with `write()` for a serialized write transaction and `read_tx()` for a
// multi-statement read), `q()`, which turns a query written with `?` placeholders into
// the backend's own, and `announce_change()`, which tells other servers of a change as its
// transaction commits (where the backend can).

/// A write transaction and the in-process write lock, released in that order.
struct WriteTx<'a> {
    tx: Transaction<'static, Db>,
    _guard: tokio::sync::MutexGuard<'a, ()>,
}

impl WriteTx<'_> {
    fn conn(&mut self) -> &mut Conn {
        &mut self.tx
    }

    async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

impl Store {
    /// Stores many new entries in one transaction, with every check of
    /// [`Datastore::create_entry`], and returns them as stored. Nothing is stored if one
    /// fails. One commit instead of one per entry, for loading large registration sets
    /// (imports, benchmarks).
    pub async fn create_entries(
        &self,
        entries: Vec<RegistrationEntry>,
    ) -> Result<Vec<RegistrationEntry>> {
        let mut tx = self.write().await?;
        let mut stored = Vec::with_capacity(entries.len());
        for entry in entries {
            stored.push(insert_new_entry(tx.conn(), entry).await?);
        }
        tx.commit().await?;
        Ok(stored)
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> DatastoreError {
    DatastoreError::Backend(format!("stored {what} is invalid: {e}"))
}

fn selectors_json(selectors: &SelectorSet) -> Result<String> {
    serde_json::to_string(selectors).map_err(|e| DatastoreError::Backend(e.to_string()))
}

fn trust_domains_json<'a>(trust_domains: impl Iterator<Item = &'a TrustDomain>) -> Result<String> {
    let names: Vec<&str> = trust_domains.map(TrustDomain::name).collect();
    serde_json::to_string(&names).map_err(|e| DatastoreError::Backend(e.to_string()))
}

/// A boolean column, stored as 0 or 1 on every backend.
fn flag(row: &DbRow, column: &str) -> Result<bool> {
    Ok(row.try_get::<i64, _>(column)? != 0)
}

fn bool_int(value: bool) -> i64 {
    i64::from(value)
}

fn count(n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|e| corrupt("count", e))
}

macro_rules! entry_columns {
    () => {
        "e.entry_id, e.spiffe_id, e.parent_id, e.selectors, e.federates_with, e.x509_svid_ttl, \
         e.jwt_svid_ttl, e.admin, e.downstream, e.expires_at, e.dns_names, e.revision_number, \
         e.store_svid, e.hint, e.created_at, e.owner, e.reason, e.ticket, e.source"
    };
}

macro_rules! agent_columns {
    () => {
        "a.spiffe_id, a.attestation_type, a.serial_number, a.expires_at, a.new_serial_number, \
         a.new_expires_at, a.can_reattest, a.selectors, a.agent_version, a.created_at, \
         a.updated_at"
    };
}

fn entry_from_row(row: &DbRow) -> Result<RegistrationEntry> {
    let id: String = row.try_get("entry_id")?;
    let spiffe_id: String = row.try_get("spiffe_id")?;
    let parent_id: String = row.try_get("parent_id")?;
    let selectors: String = row.try_get("selectors")?;
    let federates_with: String = row.try_get("federates_with")?;
    let dns_names: String = row.try_get("dns_names")?;
    let federates_with: Vec<String> =
        serde_json::from_str(&federates_with).map_err(|e| corrupt("federates_with", e))?;
    Ok(RegistrationEntry {
        id: EntryId::new(&id).map_err(|e| corrupt("entry ID", e))?,
        spiffe_id: spiffe_id.parse().map_err(|e| corrupt("spiffe_id", e))?,
        parent_id: parent_id.parse().map_err(|e| corrupt("parent_id", e))?,
        selectors: serde_json::from_str(&selectors).map_err(|e| corrupt("selectors", e))?,
        x509_svid_ttl: row
            .try_get::<Option<i64>, _>("x509_svid_ttl")?
            .map(seconds_duration)
            .transpose()?,
        jwt_svid_ttl: row
            .try_get::<Option<i64>, _>("jwt_svid_ttl")?
            .map(seconds_duration)
            .transpose()?,
        federates_with: federates_with
            .iter()
            .map(|name| TrustDomain::new(name).map_err(|e| corrupt("federates_with", e)))
            .collect::<Result<_>>()?,
        admin: flag(row, "admin")?,
        downstream: flag(row, "downstream")?,
        expires_at: row
            .try_get::<Option<i64>, _>("expires_at")?
            .map(from_unix_seconds)
            .transpose()?,
        dns_names: serde_json::from_str(&dns_names).map_err(|e| corrupt("dns_names", e))?,
        revision_number: row.try_get("revision_number")?,
        store_svid: flag(row, "store_svid")?,
        hint: row.try_get("hint")?,
        created_at: from_unix_seconds(row.try_get("created_at")?)?,
        owner: row.try_get("owner")?,
        reason: row.try_get("reason")?,
        ticket: row.try_get("ticket")?,
        source: row.try_get("source")?,
    })
}

fn agent_from_row(row: &DbRow) -> Result<AttestedAgent> {
    let spiffe_id: String = row.try_get("spiffe_id")?;
    let selectors: String = row.try_get("selectors")?;
    Ok(AttestedAgent {
        spiffe_id: spiffe_id.parse().map_err(|e| corrupt("agent ID", e))?,
        attestation_type: row.try_get("attestation_type")?,
        serial: row.try_get("serial_number")?,
        not_after: from_unix_seconds(row.try_get("expires_at")?)?,
        new_serial: row.try_get("new_serial_number")?,
        new_not_after: row
            .try_get::<Option<i64>, _>("new_expires_at")?
            .map(from_unix_seconds)
            .transpose()?,
        can_reattest: flag(row, "can_reattest")?,
        selectors: serde_json::from_str(&selectors).map_err(|e| corrupt("agent selectors", e))?,
        agent_version: row.try_get("agent_version")?,
        created_at: from_unix_seconds(row.try_get("created_at")?)?,
        updated_at: from_unix_seconds(row.try_get("updated_at")?)?,
    })
}

// ----- statements shared by several operations -----

async fn record_change(
    conn: &mut Conn,
    kind: ChangeKind,
    subject: &ChangeSubject,
) -> Result<i64> {
    let revision: i64 = sqlx::query_scalar(
        q("UPDATE store_state SET revision = revision + 1 WHERE id = 1 RETURNING revision"),
    )
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(q("INSERT INTO changes (revision, kind, subject_type, subject) VALUES (?, ?, ?, ?)"))
        .bind(revision)
        .bind(kind.as_str())
        .bind(subject.kind_str())
        .bind(subject.key())
        .execute(&mut *conn)
        .await?;
    announce_change(conn, revision).await?;
    Ok(revision)
}

async fn fetch_entry(conn: &mut Conn, id: &str) -> Result<Option<RegistrationEntry>> {
    let row = sqlx::query(q(concat!(
        "SELECT ",
        entry_columns!(),
        " FROM registered_entries e WHERE e.entry_id = ?"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(entry_from_row).transpose()
}

async fn fetch_similar_entry(
    conn: &mut Conn,
    entry: &RegistrationEntry,
) -> Result<Option<RegistrationEntry>> {
    let row = sqlx::query(q(concat!(
        "SELECT ",
        entry_columns!(),
        " FROM registered_entries e \
         WHERE e.spiffe_id = ? AND e.parent_id = ? AND e.selectors = ? AND e.entry_id <> ?"
    )))
    .bind(entry.spiffe_id.as_str())
    .bind(entry.parent_id.as_str())
    .bind(selectors_json(&entry.selectors)?)
    .bind(entry.id.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(entry_from_row).transpose()
}

/// `create_entry`'s checks and writes, inside the caller's transaction.
async fn insert_new_entry(
    conn: &mut Conn,
    entry: RegistrationEntry,
) -> Result<RegistrationEntry> {
    let mut entry = normalize_entry(entry)?;
    entry.revision_number = 0;
    if entry.selectors.is_empty() {
        return Err(DatastoreError::Invalid(
            "entry: selectors cannot be empty".into(),
        ));
    }
    if let Some(existing) = fetch_entry(conn, entry.id.as_str()).await? {
        return Err(DatastoreError::entry_exists(
            &existing,
            format!("entry {:?}", entry.id.as_str()),
        ));
    }
    if let Some(existing) = fetch_similar_entry(conn, &entry).await? {
        return Err(DatastoreError::entry_exists(
            &existing,
            "similar entry".to_owned(),
        ));
    }
    check_federated_bundles(conn, &entry).await?;
    write_entry(conn, &entry, true).await?;
    record_change(
        conn,
        ChangeKind::Created,
        &ChangeSubject::Entry(entry.id.clone()),
    )
    .await?;
    Ok(entry)
}

async fn check_federated_bundles(
    conn: &mut Conn,
    entry: &RegistrationEntry,
) -> Result<()> {
    for trust_domain in &entry.federates_with {
        let exists: Option<i64> =
            sqlx::query_scalar(q("SELECT CAST(1 AS BIGINT) FROM bundles WHERE trust_domain = ?"))
                .bind(trust_domain.name())
                .fetch_optional(&mut *conn)
                .await?;
        if exists.is_none() {
            return Err(missing_federated_bundle(trust_domain));
        }
    }
    Ok(())
}

/// Writes the entry's row (insert or replace of every column) and its child rows.
async fn write_entry(
    conn: &mut Conn,
    entry: &RegistrationEntry,
    insert: bool,
) -> Result<()> {
    let sql = if insert {
        "INSERT INTO registered_entries (spiffe_id, parent_id, selectors, federates_with, \
         x509_svid_ttl, jwt_svid_ttl, admin, downstream, expires_at, dns_names, revision_number, \
         store_svid, hint, created_at, owner, reason, ticket, source, entry_id) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    } else {
        "UPDATE registered_entries SET spiffe_id = ?, parent_id = ?, selectors = ?, \
         federates_with = ?, x509_svid_ttl = ?, jwt_svid_ttl = ?, admin = ?, downstream = ?, \
         expires_at = ?, dns_names = ?, revision_number = ?, store_svid = ?, hint = ?, \
         created_at = ?, owner = ?, reason = ?, ticket = ?, source = ? WHERE entry_id = ?"
    };
    let dns_names = serde_json::to_string(&entry.dns_names)
        .map_err(|e| DatastoreError::Backend(e.to_string()))?;
    sqlx::query(q(sql))
        .bind(entry.spiffe_id.as_str())
        .bind(entry.parent_id.as_str())
        .bind(selectors_json(&entry.selectors)?)
        .bind(trust_domains_json(entry.federates_with.iter())?)
        .bind(entry.x509_svid_ttl.map(duration_seconds).transpose()?)
        .bind(entry.jwt_svid_ttl.map(duration_seconds).transpose()?)
        .bind(bool_int(entry.admin))
        .bind(bool_int(entry.downstream))
        .bind(entry.expires_at.map(unix_seconds).transpose()?)
        .bind(dns_names)
        .bind(entry.revision_number)
        .bind(bool_int(entry.store_svid))
        .bind(entry.hint.as_str())
        .bind(unix_seconds(entry.created_at)?)
        .bind(entry.owner.as_deref())
        .bind(entry.reason.as_deref())
        .bind(entry.ticket.as_deref())
        .bind(entry.source.as_deref())
        .bind(entry.id.as_str())
        .execute(&mut *conn)
        .await?;
    if !insert {
        sqlx::query(q("DELETE FROM entry_selectors WHERE entry_id = ?"))
            .bind(entry.id.as_str())
            .execute(&mut *conn)
            .await?;
        sqlx::query(q("DELETE FROM entry_federates_with WHERE entry_id = ?"))
            .bind(entry.id.as_str())
            .execute(&mut *conn)
            .await?;
    }
    for selector in &entry.selectors {
        sqlx::query(q("INSERT INTO entry_selectors (entry_id, type, value) VALUES (?, ?, ?)"))
            .bind(entry.id.as_str())
            .bind(selector.kind())
            .bind(selector.value())
            .execute(&mut *conn)
            .await?;
    }
    for trust_domain in &entry.federates_with {
        sqlx::query(q("INSERT INTO entry_federates_with (entry_id, trust_domain) VALUES (?, ?)"))
            .bind(entry.id.as_str())
            .bind(trust_domain.name())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

async fn delete_entry_row(conn: &mut Conn, id: &EntryId) -> Result<()> {
    // Child rows go with it (ON DELETE CASCADE).
    sqlx::query(q("DELETE FROM registered_entries WHERE entry_id = ?"))
        .bind(id.as_str())
        .execute(&mut *conn)
        .await?;
    record_change(conn, ChangeKind::Deleted, &ChangeSubject::Entry(id.clone())).await?;
    Ok(())
}

async fn fetch_agent(conn: &mut Conn, id: &str) -> Result<Option<AttestedAgent>> {
    let row = sqlx::query(q(concat!(
        "SELECT ",
        agent_columns!(),
        " FROM attested_agents a WHERE a.spiffe_id = ?"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(agent_from_row).transpose()
}

async fn write_agent(
    conn: &mut Conn,
    agent: &AttestedAgent,
    insert: bool,
) -> Result<()> {
    let sql = if insert {
        "INSERT INTO attested_agents (attestation_type, serial_number, expires_at, \
         new_serial_number, new_expires_at, can_reattest, selectors, agent_version, created_at, \
         updated_at, spiffe_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    } else {
        "UPDATE attested_agents SET attestation_type = ?, serial_number = ?, expires_at = ?, \
         new_serial_number = ?, new_expires_at = ?, can_reattest = ?, selectors = ?, \
         agent_version = ?, created_at = ?, updated_at = ? WHERE spiffe_id = ?"
    };
    sqlx::query(q(sql))
        .bind(agent.attestation_type.as_str())
        .bind(agent.serial.as_str())
        .bind(unix_seconds(agent.not_after)?)
        .bind(agent.new_serial.as_str())
        .bind(agent.new_not_after.map(unix_seconds).transpose()?)
        .bind(bool_int(agent.can_reattest))
        .bind(selectors_json(&agent.selectors)?)
        .bind(agent.agent_version.as_str())
        .bind(unix_seconds(agent.created_at)?)
        .bind(unix_seconds(agent.updated_at)?)
        .bind(agent.spiffe_id.as_str())
        .execute(&mut *conn)
        .await?;
    if !insert {
        sqlx::query(q("DELETE FROM agent_selectors WHERE spiffe_id = ?"))
            .bind(agent.spiffe_id.as_str())
            .execute(&mut *conn)
            .await?;
    }
    for selector in &agent.selectors {
        sqlx::query(q("INSERT INTO agent_selectors (spiffe_id, type, value) VALUES (?, ?, ?)"))
            .bind(agent.spiffe_id.as_str())
            .bind(selector.kind())
            .bind(selector.value())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

async fn fetch_bundle_record(
    conn: &mut Conn,
    trust_domain: &str,
) -> Result<Option<BundleRecord>> {
    let Some(row) =
        sqlx::query(q("SELECT sequence_number, refresh_hint FROM bundles WHERE trust_domain = ?"))
            .bind(trust_domain)
            .fetch_optional(&mut *conn)
            .await?
    else {
        return Ok(None);
    };
    let x509_authorities = sqlx::query(
        q("SELECT der, tainted FROM bundle_x509_authorities WHERE trust_domain = ? ORDER BY position"),
    )
    .bind(trust_domain)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|row| {
        Ok(X509AuthorityRecord {
            der: row.try_get("der")?,
            tainted: flag(row, "tainted")?,
        })
    })
    .collect::<Result<_>>()?;
    let jwt_authorities = sqlx::query(
        q("SELECT key_id, public_key, expires_at, tainted FROM bundle_jwt_authorities \
         WHERE trust_domain = ? ORDER BY position"),
    )
    .bind(trust_domain)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|row| {
        Ok(JwtAuthorityRecord {
            key_id: row.try_get("key_id")?,
            public_key_der: row.try_get("public_key")?,
            expires_at: row.try_get("expires_at")?,
            tainted: flag(row, "tainted")?,
        })
    })
    .collect::<Result<_>>()?;
    Ok(Some(BundleRecord {
        trust_domain: trust_domain.to_owned(),
        sequence_number: row.try_get("sequence_number")?,
        refresh_hint: row.try_get("refresh_hint")?,
        x509_authorities,
        jwt_authorities,
    }))
}

async fn fetch_bundle(
    conn: &mut Conn,
    trust_domain: &str,
) -> Result<Option<TrustBundle>> {
    fetch_bundle_record(conn, trust_domain)
        .await?
        .map(BundleRecord::into_bundle)
        .transpose()
}

/// Creates or replaces the bundle's row and authority rows.
async fn write_bundle(conn: &mut Conn, record: &BundleRecord) -> Result<()> {
    sqlx::query(
        q("INSERT INTO bundles (trust_domain, sequence_number, refresh_hint) VALUES (?, ?, ?) \
         ON CONFLICT (trust_domain) DO UPDATE \
         SET sequence_number = excluded.sequence_number, refresh_hint = excluded.refresh_hint"),
    )
    .bind(record.trust_domain.as_str())
    .bind(record.sequence_number)
    .bind(record.refresh_hint)
    .execute(&mut *conn)
    .await?;
    sqlx::query(q("DELETE FROM bundle_x509_authorities WHERE trust_domain = ?"))
        .bind(record.trust_domain.as_str())
        .execute(&mut *conn)
        .await?;
    sqlx::query(q("DELETE FROM bundle_jwt_authorities WHERE trust_domain = ?"))
        .bind(record.trust_domain.as_str())
        .execute(&mut *conn)
        .await?;
    for (position, authority) in (0i64..).zip(&record.x509_authorities) {
        sqlx::query(
            q("INSERT INTO bundle_x509_authorities (trust_domain, position, der, tainted) \
             VALUES (?, ?, ?, ?)"),
        )
        .bind(record.trust_domain.as_str())
        .bind(position)
        .bind(authority.der.as_slice())
        .bind(bool_int(authority.tainted))
        .execute(&mut *conn)
        .await?;
    }
    for (position, authority) in (0i64..).zip(&record.jwt_authorities) {
        sqlx::query(
            q("INSERT INTO bundle_jwt_authorities \
             (trust_domain, position, key_id, public_key, expires_at, tainted) \
             VALUES (?, ?, ?, ?, ?, ?)"),
        )
        .bind(record.trust_domain.as_str())
        .bind(position)
        .bind(authority.key_id.as_str())
        .bind(authority.public_key_der.as_slice())
        .bind(authority.expires_at)
        .bind(bool_int(authority.tainted))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn bundle_exists(conn: &mut Conn, trust_domain: &str) -> Result<bool> {
    let exists: Option<i64> = sqlx::query_scalar(q("SELECT CAST(1 AS BIGINT) FROM bundles WHERE trust_domain = ?"))
        .bind(trust_domain)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(exists.is_some())
}

// ----- federation relationships -----

macro_rules! relationship_columns {
    () => {
        "r.trust_domain, r.bundle_endpoint_url, r.bundle_endpoint_profile, r.endpoint_spiffe_id"
    };
}

fn relationship_from_row(row: &DbRow) -> Result<FederationRelationship> {
    let trust_domain: String = row.try_get("trust_domain")?;
    let url: String = row.try_get("bundle_endpoint_url")?;
    let profile: String = row.try_get("bundle_endpoint_profile")?;
    let endpoint_spiffe_id: Option<String> = row.try_get("endpoint_spiffe_id")?;
    Ok(FederationRelationship::new(
        TrustDomain::new(&trust_domain).map_err(|e| corrupt("relationship trust domain", e))?,
        url.parse().map_err(|e| corrupt("bundle endpoint URL", e))?,
        BundleEndpointProfile::from_name(&profile, endpoint_spiffe_id.as_deref())
            .map_err(|e| corrupt("bundle endpoint profile", e))?,
    ))
}

/// The relationship with `trust_domain`, without its bundle.
async fn fetch_relationship(
    conn: &mut Conn,
    trust_domain: &str,
) -> Result<Option<FederationRelationship>> {
    sqlx::query(q(concat!(
        "SELECT ",
        relationship_columns!(),
        " FROM federation_relationships r WHERE r.trust_domain = ?"
    )))
    .bind(trust_domain)
    .fetch_optional(&mut *conn)
    .await?
    .as_ref()
    .map(relationship_from_row)
    .transpose()
}

/// `relationship` carrying its trust domain's bundle as stored now.
async fn relationship_with_bundle(
    conn: &mut Conn,
    relationship: FederationRelationship,
) -> Result<FederationRelationship> {
    let bundle = fetch_bundle(conn, relationship.trust_domain().name()).await?;
    with_stored_bundle(relationship, bundle)
}

/// Inserts (`insert`, unless the trust domain has one) or replaces the relationship's row;
/// returns the rows written.
async fn write_relationship(
    conn: &mut Conn,
    relationship: &FederationRelationship,
    insert: bool,
) -> Result<u64> {
    let sql = if insert {
        "INSERT INTO federation_relationships \
         (bundle_endpoint_url, bundle_endpoint_profile, endpoint_spiffe_id, trust_domain) \
         VALUES (?, ?, ?, ?) ON CONFLICT (trust_domain) DO NOTHING"
    } else {
        "UPDATE federation_relationships SET bundle_endpoint_url = ?, \
         bundle_endpoint_profile = ?, endpoint_spiffe_id = ? WHERE trust_domain = ?"
    };
    let done = sqlx::query(q(sql))
        .bind(relationship.bundle_endpoint_url().as_str())
        .bind(relationship.profile().name())
        .bind(relationship.profile().endpoint_spiffe_id().map(SpiffeId::as_str))
        .bind(relationship.trust_domain().name())
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// Makes `record` the bundle of its trust domain (created or replaced) and logs the change.
async fn put_bundle(conn: &mut Conn, record: &BundleRecord, bundle: &TrustBundle) -> Result<()> {
    let kind = if bundle_exists(conn, &record.trust_domain).await? {
        ChangeKind::Updated
    } else {
        ChangeKind::Created
    };
    write_bundle(conn, record).await?;
    record_change(conn, kind, &ChangeSubject::Bundle(bundle.trust_domain().clone())).await?;
    Ok(())
}

// ----- filters -----

/// Where a record's set lives: `children` is the child table, joined on its `key` column to
/// the owner's `owner_key`; `candidate_json` is the owner's canonical JSON copy of the set.
struct SetColumns {
    children: &'static str,
    key: &'static str,
    owner_key: &'static str,
    candidate_json: &'static str,
}

const ENTRY_SELECTORS: SetColumns = SetColumns {
    children: "entry_selectors",
    key: "entry_id",
    owner_key: "e.entry_id",
    candidate_json: "e.selectors",
};

const ENTRY_FEDERATES_WITH: SetColumns = SetColumns {
    children: "entry_federates_with",
    key: "entry_id",
    owner_key: "e.entry_id",
    candidate_json: "e.federates_with",
};

const AGENT_SELECTORS: SetColumns = SetColumns {
    children: "agent_selectors",
    key: "spiffe_id",
    owner_key: "a.spiffe_id",
    candidate_json: "a.selectors",
};

/// Appends `AND <condition>` for a set filter over a child table.
///
/// `given_json` is the canonical JSON of the given set (for [`MatchMode::Exact`]), `n_given`
/// its size, and `member` pushes "child row `c` is in the given set".
fn push_set_condition(
    qb: &mut QueryBuilder<Db>,
    mode: MatchMode,
    columns: &SetColumns,
    given_json: String,
    n_given: usize,
    member: &dyn Fn(&mut QueryBuilder<Db>),
) -> Result<()> {
    let SetColumns {
        children,
        key,
        owner_key,
        candidate_json,
    } = columns;
    let n_given = i64::try_from(n_given).map_err(|e| DatastoreError::Invalid(e.to_string()))?;
    let correlated = format!("FROM {children} c WHERE c.{key} = {owner_key}");
    match mode {
        MatchMode::Exact => {
            // Both sides are canonical (sorted, deduplicated) JSON, so equal text is equal sets.
            qb.push(format!(" AND {candidate_json} = "));
            qb.push_bind(given_json);
        }
        MatchMode::Subset => {
            qb.push(format!(
                " AND {candidate_json} <> '[]' AND NOT EXISTS (SELECT 1 {correlated} AND NOT ("
            ));
            member(qb);
            qb.push("))");
        }
        MatchMode::Superset => {
            qb.push(format!(" AND (SELECT COUNT(*) {correlated} AND ("));
            member(qb);
            qb.push(")) = ");
            qb.push_bind(n_given);
        }
        MatchMode::Any => {
            qb.push(format!(" AND EXISTS (SELECT 1 {correlated} AND ("));
            member(qb);
            qb.push("))");
        }
    }
    Ok(())
}

fn push_selector_filter(
    qb: &mut QueryBuilder<Db>,
    filter: &SelectorFilter,
    columns: &SetColumns,
) -> Result<()> {
    let selectors: Vec<Selector> = filter.selectors.iter().cloned().collect();
    let member = |qb: &mut QueryBuilder<Db>| {
        for (i, selector) in selectors.iter().enumerate() {
            if i > 0 {
                qb.push(" OR ");
            }
            qb.push("(c.type = ");
            qb.push_bind(selector.kind().to_owned());
            qb.push(" AND c.value = ");
            qb.push_bind(selector.value().to_owned());
            qb.push(")");
        }
    };
    push_set_condition(
        qb,
        filter.mode,
        columns,
        selectors_json(&filter.selectors)?,
        selectors.len(),
        &member,
    )
}

fn push_entry_filter(qb: &mut QueryBuilder<Db>, filter: &EntryFilter) -> Result<()> {
    filter.validate()?;
    if let Some(id) = &filter.by_spiffe_id {
        qb.push(" AND e.spiffe_id = ");
        qb.push_bind(id.as_str().to_owned());
    }
    if let Some(id) = &filter.by_parent_id {
        qb.push(" AND e.parent_id = ");
        qb.push_bind(id.as_str().to_owned());
    }
    if let Some(hint) = &filter.by_hint {
        qb.push(" AND e.hint = ");
        qb.push_bind(hint.clone());
    }
    if let Some(downstream) = filter.by_downstream {
        qb.push(" AND e.downstream = ");
        qb.push_bind(bool_int(downstream));
    }
    if let Some(selectors) = &filter.by_selectors {
        push_selector_filter(qb, selectors, &ENTRY_SELECTORS)?;
    }
    if let Some(federates_with) = &filter.by_federates_with {
        let names: Vec<String> = federates_with
            .trust_domains
            .iter()
            .map(|td| td.name().to_owned())
            .collect();
        let member = |qb: &mut QueryBuilder<Db>| {
            qb.push("c.trust_domain IN (");
            for (i, name) in names.iter().enumerate() {
                if i > 0 {
                    qb.push(", ");
                }
                qb.push_bind(name.clone());
            }
            qb.push(")");
        };
        push_set_condition(
            qb,
            federates_with.mode,
            &ENTRY_FEDERATES_WITH,
            trust_domains_json(federates_with.trust_domains.iter())?,
            names.len(),
            &member,
        )?;
    }
    Ok(())
}

fn push_agent_filter(qb: &mut QueryBuilder<Db>, filter: &AgentFilter) -> Result<()> {
    filter.validate()?;
    if let Some(attestation_type) = &filter.by_attestation_type {
        qb.push(" AND a.attestation_type = ");
        qb.push_bind(attestation_type.clone());
    }
    if let Some(banned) = filter.by_banned {
        qb.push(if banned {
            " AND a.serial_number = ''"
        } else {
            " AND a.serial_number <> ''"
        });
    }
    if let Some(can_reattest) = filter.by_can_reattest {
        qb.push(" AND a.can_reattest = ");
        qb.push_bind(bool_int(can_reattest));
    }
    if let Some(before) = filter.by_expires_before {
        qb.push(" AND a.expires_at < ");
        qb.push_bind(unix_seconds(whole_second(before)?)?);
    }
    if let Some(selectors) = &filter.by_selectors {
        push_selector_filter(qb, selectors, &AGENT_SELECTORS)?;
    }
    Ok(())
}

/// Appends the page condition and order: `AND key > token ORDER BY key LIMIT size + 1`.
fn push_page(qb: &mut QueryBuilder<Db>, key: &str, page: Option<&PageRequest>) -> Result<()> {
    if let Some(page) = page {
        page.validate()?;
        if let Some(token) = &page.token {
            qb.push(format!(" AND {key} > "));
            qb.push_bind(token.clone());
        }
    }
    qb.push(format!(" ORDER BY {key}"));
    if let Some(page) = page {
        qb.push(" LIMIT ");
        qb.push_bind(i64::from(page.size) + 1);
    }
    Ok(())
}

/// The entries matching `filter`, a page of them if asked, read from `pool`.
async fn select_entries(
    pool: &sqlx::Pool<Db>,
    filter: &EntryFilter,
    page: Option<&PageRequest>,
) -> Result<Page<RegistrationEntry>> {
    let mut qb = QueryBuilder::<Db>::new(concat!(
        "SELECT ",
        entry_columns!(),
        " FROM registered_entries e WHERE 1 = 1"
    ));
    push_entry_filter(&mut qb, filter)?;
    push_page(&mut qb, "e.entry_id", page)?;
    let rows = qb.build().fetch_all(pool).await?;
    let entries = rows
        .iter()
        .map(entry_from_row)
        .collect::<Result<Vec<_>>>()?;
    Ok(finish_page(entries, page, |e| e.id.as_str().to_owned()))
}

/// Cuts the extra row fetched by [`push_page`] and makes the next token from the last key.
fn finish_page<T>(
    mut items: Vec<T>,
    page: Option<&PageRequest>,
    key: impl Fn(&T) -> String,
) -> Page<T> {
    let Some(page) = page else {
        return (items, None);
    };
    let size = usize::try_from(page.size).unwrap_or(usize::MAX);
    if items.len() > size {
        items.truncate(size);
        let next = items.last().map(key);
        (items, next)
    } else {
        (items, None)
    }
}

#[async_trait::async_trait]
impl Datastore for Store {
    async fn create_entry(&self, entry: RegistrationEntry) -> Result<RegistrationEntry> {
        let mut tx = self.write().await?;
        let entry = insert_new_entry(tx.conn(), entry).await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>> {
        let mut conn = self.pool.acquire().await?;
        fetch_entry(&mut conn, id.as_str()).await
    }

    async fn update_entry(
        &self,
        entry: RegistrationEntry,
        expected_revision: Option<i64>,
    ) -> Result<RegistrationEntry> {
        let mut entry = normalize_entry(entry)?;
        if entry.selectors.is_empty() {
            return Err(DatastoreError::Invalid(
                "entry: selectors cannot be empty".into(),
            ));
        }
        let mut tx = self.write().await?;
        let Some(stored) = fetch_entry(tx.conn(), entry.id.as_str()).await? else {
            return Err(not_found("entry", entry.id.as_str()));
        };
        if let Some(expected) = expected_revision
            && stored.revision_number != expected
        {
            return Err(revision_conflict(
                &entry.id,
                expected,
                stored.revision_number,
            ));
        }
        entry.created_at = stored.created_at;
        entry.revision_number = stored.revision_number + 1;
        if let Some(existing) = fetch_similar_entry(tx.conn(), &entry).await? {
            return Err(DatastoreError::entry_exists(
                &existing,
                "similar entry".to_owned(),
            ));
        }
        check_federated_bundles(tx.conn(), &entry).await?;
        write_entry(tx.conn(), &entry, false).await?;
        record_change(
            tx.conn(),
            ChangeKind::Updated,
            &ChangeSubject::Entry(entry.id.clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn delete_entry(
        &self,
        id: &EntryId,
        expected_revision: Option<i64>,
    ) -> Result<RegistrationEntry> {
        let mut tx = self.write().await?;
        let Some(entry) = fetch_entry(tx.conn(), id.as_str()).await? else {
            return Err(not_found("entry", id.as_str()));
        };
        if let Some(expected) = expected_revision
            && entry.revision_number != expected
        {
            return Err(revision_conflict(id, expected, entry.revision_number));
        }
        delete_entry_row(tx.conn(), id).await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn list_entries(
        &self,
        filter: &EntryFilter,
        page: Option<PageRequest>,
    ) -> Result<Page<RegistrationEntry>> {
        select_entries(self.reader(), filter, page.as_ref()).await
    }

    async fn count_entries(&self, filter: &EntryFilter) -> Result<u64> {
        let mut qb =
            QueryBuilder::<Db>::new("SELECT COUNT(*) FROM registered_entries e WHERE 1 = 1");
        push_entry_filter(&mut qb, filter)?;
        count(qb.build_query_scalar::<i64>().fetch_one(self.reader()).await?)
    }

    async fn list_entries_page(&self, page: PageRequest) -> Result<Page<RegistrationEntry>> {
        // The primary: the index must not start behind the change log's revision.
        select_entries(&self.pool, &EntryFilter::default(), Some(&page)).await
    }

    async fn prune_entries(&self, expires_before: SystemTime) -> Result<Vec<EntryId>> {
        let expires_before = unix_seconds(whole_second(expires_before)?)?;
        let mut tx = self.write().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            q("SELECT entry_id FROM registered_entries \
             WHERE expires_at IS NOT NULL AND expires_at < ? ORDER BY entry_id"),
        )
        .bind(expires_before)
        .fetch_all(&mut *tx.conn())
        .await?;
        let mut pruned = Vec::with_capacity(ids.len());
        for id in ids {
            let id = EntryId::new(&id).map_err(|e| corrupt("entry ID", e))?;
            delete_entry_row(tx.conn(), &id).await?;
            pruned.push(id);
        }
        tx.commit().await?;
        Ok(pruned)
    }

    async fn current_revision(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar(q("SELECT revision FROM store_state WHERE id = 1"))
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn change_signal(&self) -> Result<Option<ChangeSignal>> {
        Ok(self.change_listener())
    }

    async fn changes_since(&self, revision: i64) -> Result<Vec<Change>>{
        let rows = sqlx::query(
            q("SELECT revision, kind, subject_type, subject FROM changes \
             WHERE revision > ? ORDER BY revision"),
        )
        .bind(revision)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                let subject_type: String = row.try_get("subject_type")?;
                let subject: String = row.try_get("subject")?;
                Ok(Change {
                    revision: row.try_get("revision")?,
                    kind: ChangeKind::parse(&kind)?,
                    subject: ChangeSubject::parse(&subject_type, &subject)?,
                })
            })
            .collect()
    }

    async fn prune_changes(&self, before: i64) -> Result<u64> {
        let mut tx = self.write().await?;
        let done = sqlx::query(q("DELETE FROM changes WHERE revision < ?"))
            .bind(before)
            .execute(&mut *tx.conn())
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn create_agent(&self, agent: AttestedAgent) -> Result<AttestedAgent> {
        let mut agent = agent;
        let now = SystemTime::now();
        agent.created_at = now;
        agent.updated_at = now;
        let agent = normalize_agent(agent)?;
        let mut tx = self.write().await?;
        if fetch_agent(tx.conn(), agent.spiffe_id.as_str())
            .await?
            .is_some()
        {
            return Err(DatastoreError::exists(format!(
                "agent {:?}",
                agent.spiffe_id.as_str()
            )));
        }
        write_agent(tx.conn(), &agent, true).await?;
        record_change(
            tx.conn(),
            ChangeKind::Created,
            &ChangeSubject::Agent(agent.spiffe_id.clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(agent)
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>> {
        let mut conn = self.pool.acquire().await?;
        fetch_agent(&mut conn, id.as_str()).await
    }

    async fn update_agent(&self, agent: AttestedAgent) -> Result<AttestedAgent> {
        let mut agent = agent;
        agent.updated_at = SystemTime::now();
        let mut agent = normalize_agent(agent)?;
        let id = agent.spiffe_id.clone();
        let mut tx = self.write().await?;
        let Some(stored) = fetch_agent(tx.conn(), id.as_str()).await? else {
            return Err(not_found("agent", id.as_str()));
        };
        if stored.is_banned() {
            return Err(banned_agent(&id));
        }
        agent.created_at = stored.created_at;
        write_agent(tx.conn(), &agent, false).await?;
        record_change(tx.conn(), ChangeKind::Updated, &ChangeSubject::Agent(id)).await?;
        tx.commit().await?;
        Ok(agent)
    }

    async fn set_agent_selectors(
        &self,
        id: &SpiffeId,
        selectors: SelectorSet,
    ) -> Result<AttestedAgent> {
        let updated_at = whole_second(SystemTime::now())?;
        self.modify_agent(id, move |agent| {
            agent.selectors = selectors;
            agent.updated_at = updated_at;
        })
        .await
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<AttestedAgent> {
        let mut tx = self.write().await?;
        let Some(agent) = fetch_agent(tx.conn(), id.as_str()).await? else {
            return Err(not_found("agent", id.as_str()));
        };
        sqlx::query(q("DELETE FROM attested_agents WHERE spiffe_id = ?"))
            .bind(id.as_str())
            .execute(&mut *tx.conn())
            .await?;
        record_change(
            tx.conn(),
            ChangeKind::Deleted,
            &ChangeSubject::Agent(id.clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(agent)
    }

    async fn ban_agent(&self, id: &SpiffeId) -> Result<AttestedAgent> {
        let updated_at = whole_second(SystemTime::now())?;
        self.modify_agent(id, move |agent| {
            agent.serial.clear();
            agent.new_serial.clear();
            agent.updated_at = updated_at;
        })
        .await
    }

    async fn list_agents(
        &self,
        filter: &AgentFilter,
        page: Option<PageRequest>,
    ) -> Result<Page<AttestedAgent>> {
        let mut qb = QueryBuilder::<Db>::new(concat!(
            "SELECT ",
            agent_columns!(),
            " FROM attested_agents a WHERE 1 = 1"
        ));
        push_agent_filter(&mut qb, filter)?;
        push_page(&mut qb, "a.spiffe_id", page.as_ref())?;
        let rows = qb.build().fetch_all(&self.pool).await?;
        let agents = rows
            .iter()
            .map(agent_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(finish_page(agents, page.as_ref(), |a| {
            a.spiffe_id.as_str().to_owned()
        }))
    }

    async fn count_agents(&self, filter: &AgentFilter) -> Result<u64> {
        let mut qb =
            QueryBuilder::<Db>::new("SELECT COUNT(*) FROM attested_agents a WHERE 1 = 1");
        push_agent_filter(&mut qb, filter)?;
        count(qb.build_query_scalar::<i64>().fetch_one(self.reader()).await?)
    }

    async fn create_join_token(
        &self,
        token: &str,
        expires_at: SystemTime,
    ) -> Result<JoinTokenRecord> {
        if token.is_empty() {
            return Err(DatastoreError::Invalid("join token: empty".into()));
        }
        let expires_at = whole_second(expires_at)?;
        let mut tx = self.write().await?;
        let inserted = sqlx::query(
            q("INSERT INTO join_tokens (token, expires_at) VALUES (?, ?) \
             ON CONFLICT (token) DO NOTHING"),
        )
        .bind(token)
        .bind(unix_seconds(expires_at)?)
        .execute(&mut *tx.conn())
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(DatastoreError::exists("join token"));
        }
        tx.commit().await?;
        Ok(JoinTokenRecord {
            token: token.to_owned(),
            expires_at,
        })
    }

    async fn take_join_token(&self, token: &str) -> Result<JoinTokenRecord> {
        let mut tx = self.write().await?;
        // One statement: of concurrent takes, whether in this process or another, exactly one
        // deletes the row and gets it back.
        let expires_at: Option<i64> =
            sqlx::query_scalar(q("DELETE FROM join_tokens WHERE token = ? RETURNING expires_at"))
                .bind(token)
                .fetch_optional(&mut *tx.conn())
                .await?;
        let Some(expires_at) = expires_at else {
            return Err(DatastoreError::NotFound("join token".into()));
        };
        tx.commit().await?;
        Ok(JoinTokenRecord {
            token: token.to_owned(),
            expires_at: from_unix_seconds(expires_at)?,
        })
    }

    async fn prune_join_tokens(&self, expires_before: SystemTime) -> Result<u64> {
        let expires_before = unix_seconds(whole_second(expires_before)?)?;
        let mut tx = self.write().await?;
        let done = sqlx::query(q("DELETE FROM join_tokens WHERE expires_at < ?"))
            .bind(expires_before)
            .execute(&mut *tx.conn())
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<TrustBundle>> {
        let mut tx = self.read_tx().await?;
        let bundle = fetch_bundle(&mut tx, trust_domain.name()).await?;
        tx.commit().await?;
        Ok(bundle)
    }

    async fn create_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle> {
        let (record, bundle) = checked_bundle(&bundle)?;
        let mut tx = self.write().await?;
        if bundle_exists(tx.conn(), &record.trust_domain).await? {
            return Err(DatastoreError::exists(format!(
                "bundle of {:?}",
                record.trust_domain
            )));
        }
        write_bundle(tx.conn(), &record).await?;
        record_change(
            tx.conn(),
            ChangeKind::Created,
            &ChangeSubject::Bundle(bundle.trust_domain().clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(bundle)
    }

    async fn update_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle> {
        let (record, bundle) = checked_bundle(&bundle)?;
        let mut tx = self.write().await?;
        if !bundle_exists(tx.conn(), &record.trust_domain).await? {
            return Err(not_found("bundle of", &record.trust_domain));
        }
        write_bundle(tx.conn(), &record).await?;
        record_change(
            tx.conn(),
            ChangeKind::Updated,
            &ChangeSubject::Bundle(bundle.trust_domain().clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(bundle)
    }

    async fn set_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle> {
        let (record, bundle) = checked_bundle(&bundle)?;
        let mut tx = self.write().await?;
        let kind = if bundle_exists(tx.conn(), &record.trust_domain).await? {
            ChangeKind::Updated
        } else {
            ChangeKind::Created
        };
        write_bundle(tx.conn(), &record).await?;
        record_change(
            tx.conn(),
            kind,
            &ChangeSubject::Bundle(bundle.trust_domain().clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(bundle)
    }

    async fn store_fetched_bundle(&self, bundle: TrustBundle) -> Result<FetchedBundleChange> {
        let (record, bundle) = checked_bundle(&bundle)?;
        let mut tx = self.write().await?;
        let stored = fetch_bundle(tx.conn(), &record.trust_domain).await?;
        let change = lanyard_core::bundle_fetch::compare_fetched(stored.as_ref(), &bundle);
        if change != FetchedBundleChange::Newer {
            return Ok(change);
        }
        let kind = if stored.is_some() {
            ChangeKind::Updated
        } else {
            ChangeKind::Created
        };
        write_bundle(tx.conn(), &record).await?;
        record_change(
            tx.conn(),
            kind,
            &ChangeSubject::Bundle(bundle.trust_domain().clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(change)
    }

    async fn append_bundle(&self, bundle: TrustBundle) -> Result<TrustBundle> {
        let (record, bundle) = checked_bundle(&bundle)?;
        let mut tx = self.write().await?;
        let (merged, kind) = match fetch_bundle(tx.conn(), &record.trust_domain).await? {
            None => (bundle, ChangeKind::Created),
            Some(stored) => match merge_bundles(&stored, &bundle)? {
                Some(merged) => (merged, ChangeKind::Updated),
                None => return Ok(stored),
            },
        };
        let (record, merged) = checked_bundle(&merged)?;
        write_bundle(tx.conn(), &record).await?;
        record_change(
            tx.conn(),
            kind,
            &ChangeSubject::Bundle(merged.trust_domain().clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(merged)
    }

    async fn delete_bundle(
        &self,
        trust_domain: &TrustDomain,
        mode: BundleDeleteMode,
    ) -> Result<TrustBundle> {
        let mut tx = self.write().await?;
        let Some(bundle) = fetch_bundle(tx.conn(), trust_domain.name()).await? else {
            return Err(not_found("bundle of", trust_domain.name()));
        };
        let federating: Vec<String> = sqlx::query_scalar(
            q("SELECT entry_id FROM entry_federates_with WHERE trust_domain = ? ORDER BY entry_id"),
        )
        .bind(trust_domain.name())
        .fetch_all(&mut *tx.conn())
        .await?;
        match mode {
            BundleDeleteMode::Restrict if !federating.is_empty() => {
                return Err(bundle_in_use(trust_domain, federating.len()));
            }
            BundleDeleteMode::Restrict => {}
            BundleDeleteMode::Delete => {
                for id in federating {
                    let id = EntryId::new(&id).map_err(|e| corrupt("entry ID", e))?;
                    delete_entry_row(tx.conn(), &id).await?;
                }
            }
            BundleDeleteMode::Dissociate => {
                for id in federating {
                    let Some(mut entry) = fetch_entry(tx.conn(), &id).await? else {
                        continue;
                    };
                    entry.federates_with.remove(trust_domain);
                    entry.revision_number += 1;
                    write_entry(tx.conn(), &entry, false).await?;
                    record_change(
                        tx.conn(),
                        ChangeKind::Updated,
                        &ChangeSubject::Entry(entry.id.clone()),
                    )
                    .await?;
                }
            }
        }
        // Authority rows go with it (ON DELETE CASCADE).
        sqlx::query(q("DELETE FROM bundles WHERE trust_domain = ?"))
            .bind(trust_domain.name())
            .execute(&mut *tx.conn())
            .await?;
        record_change(
            tx.conn(),
            ChangeKind::Deleted,
            &ChangeSubject::Bundle(trust_domain.clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(bundle)
    }

    async fn list_bundles(&self, page: Option<PageRequest>) -> Result<Page<TrustBundle>> {
        let mut qb =
            QueryBuilder::<Db>::new("SELECT b.trust_domain FROM bundles b WHERE 1 = 1");
        push_page(&mut qb, "b.trust_domain", page.as_ref())?;
        let mut tx = self.read_tx().await?;
        let names: Vec<String> = qb.build_query_scalar().fetch_all(&mut *tx).await?;
        let mut bundles = Vec::with_capacity(names.len());
        for name in &names {
            if let Some(bundle) = fetch_bundle(&mut tx, name).await? {
                bundles.push(bundle);
            }
        }
        tx.commit().await?;
        Ok(finish_page(bundles, page.as_ref(), |b| {
            b.trust_domain().name().to_owned()
        }))
    }

    async fn count_bundles(&self) -> Result<u64> {
        count(
            sqlx::query_scalar(q("SELECT COUNT(*) FROM bundles"))
                .fetch_one(self.reader())
                .await?,
        )
    }

    async fn create_federation_relationship(
        &self,
        relationship: FederationRelationship,
    ) -> Result<FederationRelationship> {
        let bundle = relationship
            .trust_domain_bundle()
            .map(checked_bundle)
            .transpose()?;
        let relationship = relationship.without_trust_domain_bundle();
        let trust_domain = relationship.trust_domain().clone();
        let mut tx = self.write().await?;
        if write_relationship(tx.conn(), &relationship, true).await? == 0 {
            return Err(DatastoreError::exists(format!(
                "federation relationship with {:?}",
                trust_domain.name()
            )));
        }
        if let Some((record, bundle)) = &bundle {
            put_bundle(tx.conn(), record, bundle).await?;
        }
        record_change(
            tx.conn(),
            ChangeKind::Created,
            &ChangeSubject::FederationRelationship(trust_domain),
        )
        .await?;
        tx.commit().await?;
        with_stored_bundle(relationship, bundle.map(|(_, bundle)| bundle))
    }

    async fn get_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>> {
        let mut tx = self.read_tx().await?;
        let relationship = match fetch_relationship(&mut tx, trust_domain.name()).await? {
            Some(relationship) => Some(relationship_with_bundle(&mut tx, relationship).await?),
            None => None,
        };
        tx.commit().await?;
        Ok(relationship)
    }

    async fn update_federation_relationship(
        &self,
        update: FederationRelationship,
        mask: RelationshipMask,
    ) -> Result<FederationRelationship> {
        let bundle = match update.trust_domain_bundle() {
            Some(bundle) if mask.trust_domain_bundle => Some(checked_bundle(bundle)?),
            _ => None,
        };
        let trust_domain = update.trust_domain().clone();
        let mut tx = self.write().await?;
        let Some(stored) = fetch_relationship(tx.conn(), trust_domain.name()).await? else {
            return Err(not_found("federation relationship with", trust_domain.name()));
        };
        let updated = stored
            .updated(&update.without_trust_domain_bundle(), &mask)
            .map_err(|e| DatastoreError::Invalid(format!("federation relationship: {e}")))?;
        if let Some((record, bundle)) = &bundle {
            put_bundle(tx.conn(), record, bundle).await?;
        }
        write_relationship(tx.conn(), &updated, false).await?;
        record_change(
            tx.conn(),
            ChangeKind::Updated,
            &ChangeSubject::FederationRelationship(trust_domain),
        )
        .await?;
        let updated = relationship_with_bundle(tx.conn(), updated).await?;
        tx.commit().await?;
        Ok(updated)
    }

    async fn delete_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<FederationRelationship> {
        let mut tx = self.write().await?;
        let Some(deleted) = fetch_relationship(tx.conn(), trust_domain.name()).await? else {
            return Err(not_found("federation relationship with", trust_domain.name()));
        };
        // The trust domain's bundle stays, as in SPIRE.
        sqlx::query(q("DELETE FROM federation_relationships WHERE trust_domain = ?"))
            .bind(trust_domain.name())
            .execute(&mut *tx.conn())
            .await?;
        record_change(
            tx.conn(),
            ChangeKind::Deleted,
            &ChangeSubject::FederationRelationship(trust_domain.clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn list_federation_relationships(
        &self,
        page: Option<PageRequest>,
    ) -> Result<Page<FederationRelationship>> {
        let mut qb = QueryBuilder::<Db>::new(concat!(
            "SELECT ",
            relationship_columns!(),
            " FROM federation_relationships r WHERE 1 = 1"
        ));
        push_page(&mut qb, "r.trust_domain", page.as_ref())?;
        let mut tx = self.read_tx().await?;
        let rows = qb.build().fetch_all(&mut *tx).await?;
        let mut relationships = Vec::with_capacity(rows.len());
        for row in &rows {
            let relationship = relationship_from_row(row)?;
            relationships.push(relationship_with_bundle(&mut tx, relationship).await?);
        }
        tx.commit().await?;
        Ok(finish_page(relationships, page.as_ref(), |r| {
            r.trust_domain().name().to_owned()
        }))
    }

    async fn get_ca_journal(&self, server_key: &str) -> Result<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar(q("SELECT data FROM ca_journals WHERE server_key = ?"))
                .bind(server_key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn set_ca_journal(&self, server_key: &str, journal: &[u8]) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            q("INSERT INTO ca_journals (server_key, data) VALUES (?, ?) \
             ON CONFLICT (server_key) DO UPDATE SET data = excluded.data"),
        )
        .bind(server_key)
        .bind(journal)
        .execute(&mut *tx.conn())
        .await?;
        tx.commit().await
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar(q("SELECT value FROM meta WHERE key = ?"))
            .bind(key)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn set_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            q("INSERT INTO meta (key, value) VALUES (?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
        )
        .bind(key)
        .bind(value)
        .execute(&mut *tx.conn())
        .await?;
        tx.commit().await
    }

    async fn create_exception(&self, exception: Exception) -> Result<Exception> {
        let mut exception = normalize_exception(exception)?;
        exception.revision = 1;
        let mut tx = self.write().await?;
        let inserted = write_exception(tx.conn(), &exception, true).await?;
        if inserted == 0 {
            return Err(DatastoreError::exists(format!(
                "exception {:?}",
                exception.id
            )));
        }
        record_change(
            tx.conn(),
            ChangeKind::Created,
            &ChangeSubject::Exception(exception.id.clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(exception)
    }

    async fn get_exception(&self, id: &str) -> Result<Option<Exception>> {
        sqlx::query(q(concat!(
            "SELECT ",
            exception_columns!(),
            " FROM policy_exceptions WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(exception_from_row)
        .transpose()
    }

    async fn update_exception(&self, exception: Exception) -> Result<Exception> {
        let mut exception = normalize_exception(exception)?;
        let mut tx = self.write().await?;
        let stored: Option<i64> = sqlx::query_scalar(q(
            "SELECT revision FROM policy_exceptions WHERE id = ?",
        ))
        .bind(exception.id.as_str())
        .fetch_optional(tx.conn())
        .await?;
        match stored {
            None => return Err(not_found("exception", &exception.id)),
            Some(revision) if revision != exception.revision => {
                return Err(exception_conflict(&exception.id, exception.revision, revision));
            }
            Some(revision) => exception.revision = revision + 1,
        }
        write_exception(tx.conn(), &exception, false).await?;
        record_change(
            tx.conn(),
            ChangeKind::Updated,
            &ChangeSubject::Exception(exception.id.clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(exception)
    }

    async fn list_exceptions(&self) -> Result<Vec<Exception>> {
        sqlx::query(q(concat!(
            "SELECT ",
            exception_columns!(),
            " FROM policy_exceptions ORDER BY id"
        )))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(exception_from_row)
        .collect()
    }

    async fn record_issuances(&self, issuances: &[Issuance]) -> Result<()> {
        if issuances.is_empty() {
            return Ok(());
        }
        let mut tx = self.write().await?;
        // SQLite allows 32766 bound parameters per statement; 9 per row.
        for chunk in issuances.chunks(1000) {
            let mut builder: QueryBuilder<Db> = QueryBuilder::new(
                "INSERT INTO issuances (kind, serial, entry_id, spiffe_id, agent_id, \
                 authority_id, issued_at, not_after, exception_ids) ",
            );
            let mut rows = Vec::with_capacity(chunk.len());
            for issuance in chunk {
                rows.push((
                    issuance,
                    unix_seconds(issuance.issued_at)?,
                    unix_seconds(issuance.not_after)?,
                    serde_json::to_string(&issuance.exception_ids)
                        .map_err(|e| DatastoreError::Backend(e.to_string()))?,
                ));
            }
            builder.push_values(
                rows,
                |mut row, (issuance, issued_at, not_after, exceptions)| {
                    row.push_bind(issuance.kind.as_str())
                        .push_bind(issuance.serial.clone())
                        .push_bind(issuance.entry_id.clone())
                        .push_bind(issuance.spiffe_id.as_str().to_owned())
                        .push_bind(issuance.agent_id.as_str().to_owned())
                        .push_bind(issuance.authority_id.clone())
                        .push_bind(issued_at)
                        .push_bind(not_after)
                        .push_bind(exceptions);
                },
            );
            builder.push(" ON CONFLICT (kind, serial) DO NOTHING");
            builder.build().execute(&mut *tx.conn()).await?;
        }
        tx.commit().await
    }

    async fn list_issuances(
        &self,
        filter: &IssuanceFilter,
        page: Option<PageRequest>,
    ) -> Result<Page<Issuance>> {
        let offset = match &page {
            Some(page) => {
                page.validate()?;
                page_offset(page.token.as_deref())?
            }
            None => 0,
        };
        let mut builder: QueryBuilder<Db> = QueryBuilder::new(
            "SELECT kind, serial, entry_id, spiffe_id, agent_id, authority_id, issued_at, \
             not_after, exception_ids FROM issuances WHERE 1 = 1",
        );
        if let Some(id) = &filter.entry_id {
            builder.push(" AND entry_id = ").push_bind(id.clone());
        }
        if let Some(id) = &filter.spiffe_id {
            builder
                .push(" AND spiffe_id = ")
                .push_bind(id.as_str().to_owned());
        }
        if let Some(id) = &filter.agent_id {
            builder
                .push(" AND agent_id = ")
                .push_bind(id.as_str().to_owned());
        }
        if let Some(id) = &filter.authority_id {
            builder.push(" AND authority_id = ").push_bind(id.clone());
        }
        if let Some(instant) = filter.valid_after {
            builder
                .push(" AND not_after > ")
                .push_bind(unix_seconds(instant)?);
        }
        builder.push(" ORDER BY issued_at DESC, kind, serial");
        if let Some(page) = &page {
            builder
                .push(" LIMIT ")
                .push_bind(i64::from(page.size) + 1)
                .push(" OFFSET ")
                .push_bind(offset);
        }
        let rows = builder.build().fetch_all(self.reader()).await?;
        let mut issuances = rows
            .iter()
            .map(issuance_from_row)
            .collect::<Result<Vec<_>>>()?;
        let next = match &page {
            Some(page) if issuances.len() > page.size as usize => {
                issuances.truncate(page.size as usize);
                Some(offset.saturating_add(i64::from(page.size)).to_string())
            }
            _ => None,
        };
        Ok((issuances, next))
    }

    async fn prune_issuances(&self, issued_before: SystemTime) -> Result<u64> {
        let mut tx = self.write().await?;
        let done = sqlx::query(q("DELETE FROM issuances WHERE issued_at < ?"))
            .bind(unix_seconds(issued_before)?)
            .execute(&mut *tx.conn())
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn record_served(
        &self,
        agent_id: &SpiffeId,
        served: &[(String, SystemTime)],
    ) -> Result<()> {
        if served.is_empty() {
            return Ok(());
        }
        let mut tx = self.write().await?;
        for (entry_id, at) in served {
            sqlx::query(
                q("INSERT INTO entry_usage (entry_id, agent_id, last_served_at) VALUES (?, ?, ?) \
                 ON CONFLICT (entry_id, agent_id) DO UPDATE \
                 SET last_served_at = CASE WHEN excluded.last_served_at > entry_usage.last_served_at \
                 THEN excluded.last_served_at ELSE entry_usage.last_served_at END"),
            )
            .bind(entry_id)
            .bind(agent_id.as_str())
            .bind(unix_seconds(*at)?)
            .execute(&mut *tx.conn())
            .await?;
        }
        tx.commit().await
    }

    async fn list_usage(&self, entry_ids: &[String]) -> Result<Vec<EntryUsage>> {
        let mut issued: QueryBuilder<Db> = QueryBuilder::new(
            "SELECT entry_id, agent_id, MAX(issued_at) AS last, COUNT(*) AS n FROM issuances \
             WHERE entry_id != ''",
        );
        let mut served: QueryBuilder<Db> = QueryBuilder::new(
            "SELECT entry_id, agent_id, last_served_at FROM entry_usage WHERE 1 = 1",
        );
        if !entry_ids.is_empty() {
            for builder in [&mut issued, &mut served] {
                builder.push(" AND entry_id IN (");
                let mut list = builder.separated(", ");
                for id in entry_ids {
                    list.push_bind(id.clone());
                }
                builder.push(")");
            }
        }
        issued.push(" GROUP BY entry_id, agent_id");
        let mut usage = std::collections::BTreeMap::<(String, String), EntryUsage>::new();
        let mut tx = self.read_tx().await?;
        for row in issued.build().fetch_all(&mut *tx).await? {
            let key: (String, String) = (row.try_get("entry_id")?, row.try_get("agent_id")?);
            let record = usage_record(&mut usage, key);
            record.last_issued_at = Some(from_unix_seconds(row.try_get("last")?)?);
            record.issued = count(row.try_get("n")?)?;
        }
        for row in served.build().fetch_all(&mut *tx).await? {
            let key: (String, String) = (row.try_get("entry_id")?, row.try_get("agent_id")?);
            usage_record(&mut usage, key).last_served_at =
                Some(from_unix_seconds(row.try_get("last_served_at")?)?);
        }
        tx.commit().await?;
        Ok(usage.into_values().collect())
    }

    async fn create_revocation(
        &self,
        revocation: Revocation,
        serials: &[RevokedSerial],
    ) -> Result<Revocation> {
        let mut revocation = normalize_revocation(revocation)?;
        let serials = normalize_revoked_serials(serials)?;
        let mut tx = self.write().await?;
        // Writes are serialized, so the next number is the last one given plus one; the last
        // is kept apart from the rows, so that a number is never given twice after a prune.
        let given: Option<Vec<u8>> = sqlx::query_scalar(q("SELECT value FROM meta WHERE key = ?"))
            .bind(REVOCATION_SEQUENCE_KEY)
            .fetch_optional(tx.conn())
            .await?;
        let given = given
            .map(|bytes| {
                std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|text| text.parse::<i64>().ok())
                    .ok_or_else(|| corrupt("revocation sequence", "not a number"))
            })
            .transpose()?
            .unwrap_or(0);
        let last: Option<i64> = sqlx::query_scalar(q("SELECT MAX(sequence) FROM revocations"))
            .fetch_one(tx.conn())
            .await?;
        revocation.sequence = given.max(last.unwrap_or(0)) + 1;
        sqlx::query(q(
            "INSERT INTO meta (key, value) VALUES (?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        ))
        .bind(REVOCATION_SEQUENCE_KEY)
        .bind(revocation.sequence.to_string().into_bytes())
        .execute(&mut *tx.conn())
        .await?;
        let inserted = sqlx::query(q(
            "INSERT INTO revocations (id, sequence, kind, value, owner, reason, ticket, \
             created_at, created_by, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO NOTHING",
        ))
        .bind(revocation.id.as_str())
        .bind(revocation.sequence)
        .bind(revocation.target.kind())
        .bind(revocation.target.value())
        .bind(revocation.owner.as_str())
        .bind(revocation.reason.as_str())
        .bind(revocation.ticket.as_str())
        .bind(unix_seconds(revocation.created_at)?)
        .bind(revocation.created_by.as_str())
        .bind(unix_seconds(revocation.expires_at)?)
        .execute(&mut *tx.conn())
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(DatastoreError::exists(format!(
                "revocation {:?}",
                revocation.id
            )));
        }
        insert_revoked_serials(tx.conn(), &revocation.id, &serials).await?;
        record_change(
            tx.conn(),
            ChangeKind::Created,
            &ChangeSubject::Revocation(revocation.id.clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(revocation)
    }

    async fn get_revocation(&self, id: &str) -> Result<Option<Revocation>> {
        sqlx::query(q(concat!(
            "SELECT ",
            revocation_columns!(),
            " FROM revocations WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(revocation_from_row)
        .transpose()
    }

    async fn list_revocations(&self, after_sequence: i64) -> Result<Vec<Revocation>> {
        sqlx::query(q(concat!(
            "SELECT ",
            revocation_columns!(),
            " FROM revocations WHERE sequence > ? ORDER BY sequence"
        )))
        .bind(after_sequence)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(revocation_from_row)
        .collect()
    }

    async fn add_revoked_serials(
        &self,
        revocation_id: &str,
        serials: &[RevokedSerial],
    ) -> Result<()> {
        let serials = normalize_revoked_serials(serials)?;
        let mut tx = self.write().await?;
        let exists: Option<i64> =
            sqlx::query_scalar(q("SELECT sequence FROM revocations WHERE id = ?"))
                .bind(revocation_id)
                .fetch_optional(tx.conn())
                .await?;
        if exists.is_none() {
            return Err(not_found("revocation", revocation_id));
        }
        let added = insert_revoked_serials(tx.conn(), revocation_id, &serials).await?;
        if added > 0 {
            record_change(
                tx.conn(),
                ChangeKind::Updated,
                &ChangeSubject::Revocation(revocation_id.to_owned()),
            )
            .await?;
        }
        tx.commit().await
    }

    async fn list_revoked_serials(
        &self,
        revocation_id: Option<&str>,
    ) -> Result<Vec<RevokedSerial>> {
        let mut builder: QueryBuilder<Db> = QueryBuilder::new(
            "SELECT serial, authority_id, revoked_at FROM revoked_serials",
        );
        if let Some(id) = revocation_id {
            builder
                .push(" WHERE revocation_id = ")
                .push_bind(id.to_owned());
        }
        let rows = builder.build().fetch_all(&self.pool).await?;
        let mut out = rows
            .iter()
            .map(|row| {
                Ok(RevokedSerial {
                    serial: row.try_get("serial")?,
                    authority_id: row.try_get("authority_id")?,
                    revoked_at: from_unix_seconds(row.try_get("revoked_at")?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.sort();
        Ok(out)
    }

    async fn acknowledge_revocations(
        &self,
        agent_id: &SpiffeId,
        sequence: i64,
        at: SystemTime,
    ) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(q(
            "INSERT INTO revocation_acks (agent_id, sequence, acked_at) VALUES (?, ?, ?) \
             ON CONFLICT (agent_id) DO UPDATE SET sequence = excluded.sequence, \
             acked_at = excluded.acked_at WHERE excluded.sequence >= revocation_acks.sequence",
        ))
        .bind(agent_id.as_str())
        .bind(sequence)
        .bind(unix_seconds(at)?)
        .execute(&mut *tx.conn())
        .await?;
        tx.commit().await
    }

    async fn list_revocation_acks(&self) -> Result<Vec<RevocationAck>> {
        sqlx::query(q(
            "SELECT agent_id, sequence, acked_at FROM revocation_acks ORDER BY agent_id",
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            let agent_id: String = row.try_get("agent_id")?;
            Ok(RevocationAck {
                agent_id: agent_id
                    .parse()
                    .map_err(|e| corrupt("acknowledging agent ID", e))?,
                sequence: row.try_get("sequence")?,
                acked_at: from_unix_seconds(row.try_get("acked_at")?)?,
            })
        })
        .collect()
    }

    async fn get_revocation_ack(&self, agent_id: &SpiffeId) -> Result<Option<RevocationAck>> {
        sqlx::query(q(
            "SELECT sequence, acked_at FROM revocation_acks WHERE agent_id = ?",
        ))
        .bind(agent_id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .map(|row| {
            Ok(RevocationAck {
                agent_id: agent_id.clone(),
                sequence: row.try_get("sequence")?,
                acked_at: from_unix_seconds(row.try_get("acked_at")?)?,
            })
        })
        .transpose()
    }

    async fn publish_crls(&self, crls: &[PublishedCrl]) -> Result<usize> {
        let crls = crls
            .iter()
            .map(normalize_published_crl)
            .collect::<Result<Vec<_>>>()?;
        let mut tx = self.write().await?;
        let mut written = 0;
        for crl in &crls {
            let number = i64::try_from(crl.number).unwrap_or(i64::MAX);
            let affected = sqlx::query(q(
                "INSERT INTO published_crls (authority_id, der, number, next_update) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (authority_id) DO UPDATE SET \
                 der = excluded.der, number = excluded.number, next_update = excluded.next_update \
                 WHERE excluded.number > published_crls.number",
            ))
            .bind(crl.authority_id.as_str())
            .bind(crl.der.as_slice())
            .bind(number)
            .bind(unix_seconds(crl.next_update)?)
            .execute(&mut *tx.conn())
            .await?
            .rows_affected();
            if affected > 0 {
                record_change(
                    tx.conn(),
                    ChangeKind::Updated,
                    &ChangeSubject::Crl(crl.authority_id.clone()),
                )
                .await?;
                written += 1;
            }
        }
        tx.commit().await?;
        Ok(written)
    }

    async fn list_published_crls(&self) -> Result<Vec<PublishedCrl>> {
        sqlx::query(q(
            "SELECT authority_id, der, number, next_update FROM published_crls \
             ORDER BY authority_id",
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            let number: i64 = row.try_get("number")?;
            Ok(PublishedCrl {
                authority_id: row.try_get("authority_id")?,
                der: row.try_get("der")?,
                number: u64::try_from(number).map_err(|e| corrupt("CRL number", e))?,
                next_update: from_unix_seconds(row.try_get("next_update")?)?,
            })
        })
        .collect()
    }

    async fn prune_published_crls(&self, before: SystemTime) -> Result<u64> {
        let mut tx = self.write().await?;
        let pruned = sqlx::query(q("DELETE FROM published_crls WHERE next_update < ?"))
            .bind(unix_seconds(before)?)
            .execute(&mut *tx.conn())
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(pruned)
    }

    async fn prune_revocations(&self, expired_before: SystemTime) -> Result<u64> {
        let mut tx = self.write().await?;
        let before = unix_seconds(expired_before)?;
        sqlx::query(q(
            "DELETE FROM revoked_serials WHERE revocation_id IN \
             (SELECT id FROM revocations WHERE expires_at < ?)",
        ))
        .bind(before)
        .execute(&mut *tx.conn())
        .await?;
        let done = sqlx::query(q("DELETE FROM revocations WHERE expires_at < ?"))
            .bind(before)
            .execute(&mut *tx.conn())
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}

impl Store {
    /// Reads the agent, applies `change`, writes it back and logs an update, in one
    /// transaction.
    async fn modify_agent(
        &self,
        id: &SpiffeId,
        change: impl FnOnce(&mut AttestedAgent) + Send,
    ) -> Result<AttestedAgent> {
        let mut tx = self.write().await?;
        let Some(mut agent) = fetch_agent(tx.conn(), id.as_str()).await? else {
            return Err(not_found("agent", id.as_str()));
        };
        change(&mut agent);
        write_agent(tx.conn(), &agent, false).await?;
        record_change(
            tx.conn(),
            ChangeKind::Updated,
            &ChangeSubject::Agent(id.clone()),
        )
        .await?;
        tx.commit().await?;
        Ok(agent)
    }
}

/// The `meta` key holding the last revocation sequence given.
const REVOCATION_SEQUENCE_KEY: &str = "revocation_sequence";

macro_rules! revocation_columns {
    () => {
        "id, sequence, kind, value, owner, reason, ticket, created_at, created_by, expires_at"
    };
}
use revocation_columns;

fn revocation_from_row(row: &DbRow) -> Result<Revocation> {
    let kind: String = row.try_get("kind")?;
    let value: String = row.try_get("value")?;
    Ok(Revocation {
        id: row.try_get("id")?,
        target: RevocationTarget::parse(&kind, &value)
            .map_err(|e| corrupt("revocation target", e))?,
        owner: row.try_get("owner")?,
        reason: row.try_get("reason")?,
        ticket: row.try_get("ticket")?,
        created_at: from_unix_seconds(row.try_get("created_at")?)?,
        created_by: row.try_get("created_by")?,
        expires_at: from_unix_seconds(row.try_get("expires_at")?)?,
        sequence: row.try_get("sequence")?,
    })
}

/// Inserts the serials a revocation lists that it does not list yet; returns how many.
async fn insert_revoked_serials(
    conn: &mut Conn,
    revocation_id: &str,
    serials: &[RevokedSerial],
) -> Result<u64> {
    let mut added = 0;
    // 4 parameters per row, well under either database's limit.
    for chunk in serials.chunks(1000) {
        let mut builder: QueryBuilder<Db> = QueryBuilder::new(
            "INSERT INTO revoked_serials (revocation_id, serial, authority_id, revoked_at) ",
        );
        let mut rows = Vec::with_capacity(chunk.len());
        for serial in chunk {
            rows.push((serial, unix_seconds(serial.revoked_at)?));
        }
        builder.push_values(rows, |mut row, (serial, revoked_at)| {
            row.push_bind(revocation_id.to_owned())
                .push_bind(serial.serial.clone())
                .push_bind(serial.authority_id.clone())
                .push_bind(revoked_at);
        });
        builder.push(" ON CONFLICT (revocation_id, serial) DO NOTHING");
        added += builder.build().execute(&mut *conn).await?.rows_affected();
    }
    Ok(added)
}

macro_rules! exception_columns {
    () => {
        "id, owner, reason, ticket, rules, entry_ids, spiffe_id_pattern, expires_at, \
         created_at, created_by, revoked_at, revision"
    };
}
use exception_columns;

/// Inserts (`insert`) or replaces the exception's row; returns the rows written.
async fn write_exception(
    conn: &mut Conn,
    exception: &Exception,
    insert: bool,
) -> Result<u64> {
    let sql = if insert {
        "INSERT INTO policy_exceptions (owner, reason, ticket, rules, entry_ids, \
         spiffe_id_pattern, expires_at, created_at, created_by, revoked_at, revision, id) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
    } else {
        "UPDATE policy_exceptions SET owner = ?, reason = ?, ticket = ?, rules = ?, \
         entry_ids = ?, spiffe_id_pattern = ?, expires_at = ?, created_at = ?, \
         created_by = ?, revoked_at = ?, revision = ? WHERE id = ?"
    };
    let json = |set: &std::collections::BTreeSet<String>| {
        serde_json::to_string(set).map_err(|e| DatastoreError::Backend(e.to_string()))
    };
    let done = sqlx::query(q(sql))
        .bind(exception.owner.as_str())
        .bind(exception.reason.as_str())
        .bind(exception.ticket.as_deref())
        .bind(json(&exception.rules)?)
        .bind(json(&exception.entry_ids)?)
        .bind(exception.spiffe_id_pattern.as_deref())
        .bind(unix_seconds(exception.expires_at)?)
        .bind(unix_seconds(exception.created_at)?)
        .bind(exception.created_by.as_str())
        .bind(exception.revoked_at.map(unix_seconds).transpose()?)
        .bind(exception.revision)
        .bind(exception.id.as_str())
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

fn exception_from_row(row: &DbRow) -> Result<Exception> {
    let rules: String = row.try_get("rules")?;
    let entry_ids: String = row.try_get("entry_ids")?;
    Ok(Exception {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        reason: row.try_get("reason")?,
        ticket: row.try_get("ticket")?,
        rules: serde_json::from_str(&rules).map_err(|e| corrupt("exception rules", e))?,
        entry_ids: serde_json::from_str(&entry_ids)
            .map_err(|e| corrupt("exception entry_ids", e))?,
        spiffe_id_pattern: row.try_get("spiffe_id_pattern")?,
        expires_at: from_unix_seconds(row.try_get("expires_at")?)?,
        created_at: from_unix_seconds(row.try_get("created_at")?)?,
        created_by: row.try_get("created_by")?,
        revoked_at: row
            .try_get::<Option<i64>, _>("revoked_at")?
            .map(from_unix_seconds)
            .transpose()?,
        revision: row.try_get("revision")?,
    })
}

fn issuance_from_row(row: &DbRow) -> Result<Issuance> {
    let kind: String = row.try_get("kind")?;
    let spiffe_id: String = row.try_get("spiffe_id")?;
    let agent_id: String = row.try_get("agent_id")?;
    let exception_ids: String = row.try_get("exception_ids")?;
    Ok(Issuance {
        kind: IssuanceKind::parse(&kind).ok_or_else(|| {
            DatastoreError::Backend(format!("unknown issuance kind {kind:?} in the ledger"))
        })?,
        serial: row.try_get("serial")?,
        entry_id: row.try_get("entry_id")?,
        spiffe_id: spiffe_id
            .parse()
            .map_err(|e| corrupt("issuance spiffe_id", e))?,
        agent_id: agent_id
            .parse()
            .map_err(|e| corrupt("issuance agent_id", e))?,
        authority_id: row.try_get("authority_id")?,
        issued_at: from_unix_seconds(row.try_get("issued_at")?)?,
        not_after: from_unix_seconds(row.try_get("not_after")?)?,
        exception_ids: serde_json::from_str(&exception_ids)
            .map_err(|e| corrupt("issuance exception_ids", e))?,
    })
}

/// The row offset a page token stands for (the empty or absent token is the first page).
fn page_offset(token: Option<&str>) -> Result<i64> {
    match token {
        None | Some("") => Ok(0),
        Some(token) => token
            .parse::<i64>()
            .ok()
            .filter(|offset| *offset >= 0)
            .ok_or_else(|| DatastoreError::Invalid(format!("page token {token:?}"))),
    }
}
