//! libvirt's events through its own client library, for the URIs virtgate's own client
//! ([`super::native`]) does not speak: the test driver, remote hosts, TLS, SSH, SASL.
//!
//! libvirt (`libvirt.so.0`) is loaded when such a URI is followed, with `libloading`, not
//! linked: the hook, which runs on every VM start, never pays for loading it, and a host
//! without libvirt's client library still runs the daemon. The connection is read-only,
//! with keepalive; a close callback notices libvirtd going away, and the connection is
//! opened again with backoff (1 s doubling to 30 s). libvirt's default event loop runs in
//! its own thread, registered before the connection is opened, as libvirt requires.

use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Shared;

type Conn = *mut c_void;
type GenericCallback = unsafe extern "C" fn(Conn, *mut c_void, *mut c_void);
type FreeCallback = Option<unsafe extern "C" fn(*mut c_void)>;
type CloseCallback = unsafe extern "C" fn(Conn, c_int, *mut c_void);

const VIR_DOMAIN_EVENT_ID_LIFECYCLE: c_int = 0;
const VIR_DOMAIN_EVENT_ID_METADATA_CHANGE: c_int = 23;
const VIR_NETWORK_EVENT_ID_LIFECYCLE: c_int = 0;
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The few functions of libvirt's C API used here.
struct Api {
    register_default_impl: unsafe extern "C" fn() -> c_int,
    run_default_impl: unsafe extern "C" fn() -> c_int,
    open_read_only: unsafe extern "C" fn(*const c_char) -> Conn,
    close: unsafe extern "C" fn(Conn) -> c_int,
    set_keep_alive: unsafe extern "C" fn(Conn, c_int, c_uint) -> c_int,
    domain_event_register_any: unsafe extern "C" fn(
        Conn,
        *mut c_void,
        c_int,
        GenericCallback,
        *mut c_void,
        FreeCallback,
    ) -> c_int,
    domain_event_deregister_any: unsafe extern "C" fn(Conn, c_int) -> c_int,
    network_event_register_any: unsafe extern "C" fn(
        Conn,
        *mut c_void,
        c_int,
        GenericCallback,
        *mut c_void,
        FreeCallback,
    ) -> c_int,
    network_event_deregister_any: unsafe extern "C" fn(Conn, c_int) -> c_int,
    register_close_callback:
        unsafe extern "C" fn(Conn, CloseCallback, *mut c_void, FreeCallback) -> c_int,
    unregister_close_callback: unsafe extern "C" fn(Conn, CloseCallback) -> c_int,
    set_error_func:
        unsafe extern "C" fn(*mut c_void, Option<unsafe extern "C" fn(*mut c_void, *mut c_void)>),
    /// Kept loaded for as long as the functions above are used.
    _lib: libloading::Library,
}

impl Api {
    fn load() -> Result<Api, String> {
        // SAFETY: loading libvirt's client library runs its initialisers, which only set
        // up libvirt's own state
        let lib = unsafe { libloading::Library::new("libvirt.so.0") }
            .map_err(|e| format!("libvirt.so.0: {e}"))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol has the C signature of the field it is stored in
                // (libvirt's public API, stable since before 1.3)
                *unsafe { lib.get($name) }.map_err(|e| format!("libvirt.so.0: {e}"))?
            };
        }
        Ok(Api {
            register_default_impl: sym!(b"virEventRegisterDefaultImpl\0"),
            run_default_impl: sym!(b"virEventRunDefaultImpl\0"),
            open_read_only: sym!(b"virConnectOpenReadOnly\0"),
            close: sym!(b"virConnectClose\0"),
            set_keep_alive: sym!(b"virConnectSetKeepAlive\0"),
            domain_event_register_any: sym!(b"virConnectDomainEventRegisterAny\0"),
            domain_event_deregister_any: sym!(b"virConnectDomainEventDeregisterAny\0"),
            network_event_register_any: sym!(b"virConnectNetworkEventRegisterAny\0"),
            network_event_deregister_any: sym!(b"virConnectNetworkEventDeregisterAny\0"),
            register_close_callback: sym!(b"virConnectRegisterCloseCallback\0"),
            unregister_close_callback: sym!(b"virConnectUnregisterCloseCallback\0"),
            set_error_func: sym!(b"virSetErrorFunc\0"),
            _lib: lib,
        })
    }
}

/// An event: counted, and the daemon woken.
///
/// # Safety
/// `opaque` points to a live [`Shared`].
unsafe fn noted(opaque: *mut c_void) -> c_int {
    // SAFETY: by the caller
    let s = unsafe { &*(opaque as *const Shared) };
    s.events.fetch_add(1, Ordering::Relaxed);
    s.wake();
    0
}

/// Every event callback: what happened does not matter, only that something did (the
/// daemon reads libvirt's files, level-triggered).
unsafe extern "C" fn on_domain_lifecycle(
    _c: Conn,
    _d: *mut c_void,
    _event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: opaque is the Shared the thread keeps alive while callbacks are registered
    unsafe { noted(opaque) }
}

unsafe extern "C" fn on_domain_metadata(
    _c: Conn,
    _d: *mut c_void,
    _kind: c_int,
    _nsuri: *const c_char,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: as in on_domain_lifecycle
    unsafe { noted(opaque) }
}

unsafe extern "C" fn on_network_lifecycle(
    _c: Conn,
    _n: *mut c_void,
    _event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: as in on_domain_lifecycle
    unsafe { noted(opaque) }
}

unsafe extern "C" fn on_close(_c: Conn, _reason: c_int, opaque: *mut c_void) {
    // SAFETY: as in on_domain_lifecycle
    let s = unsafe { &*(opaque as *const Shared) };
    s.closed.store(true, Ordering::SeqCst);
}

/// libvirt prints every error to stderr unless told otherwise: the daemon logs its own.
unsafe extern "C" fn quiet(_user: *mut c_void, _err: *mut c_void) {}

/// Loads libvirt's client library and follows `uri` (read-only) in a thread of its own;
/// Err if the library is not there. A libvirtd that cannot be reached is retried there.
pub fn start(uri: &str, shared: Arc<Shared>) -> Result<(), String> {
    let api = Api::load()?;
    let uri = CString::new(uri).map_err(|_| "a libvirt URI with a NUL byte".to_string())?;
    // SAFETY: both take no pointers; the event loop is registered before any connection
    // is opened, as libvirt requires
    unsafe {
        (api.set_error_func)(std::ptr::null_mut(), Some(quiet));
        if (api.register_default_impl)() < 0 {
            return Err("libvirt: cannot register its event loop".into());
        }
    }
    std::thread::Builder::new()
        .name("libvirt-events".into())
        .spawn(move || follow(&api, &uri, &shared))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The thread: connect, register, run the event loop until the connection closes, and
/// again, for as long as the daemon runs.
fn follow(api: &Api, uri: &CString, s: &Arc<Shared>) {
    let opaque = Arc::as_ptr(s) as *mut c_void;
    let mut backoff = Duration::from_secs(1);
    loop {
        // SAFETY: uri is a valid C string; a null return is a failure
        let conn = unsafe { (api.open_read_only)(uri.as_ptr()) };
        if conn.is_null() {
            tracing::debug!(
                "libvirt {}: cannot connect; again in {} s",
                uri.to_string_lossy(),
                backoff.as_secs()
            );
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
        backoff = Duration::from_secs(1);
        s.closed.store(false, Ordering::SeqCst);
        let ids = register(api, conn, opaque);
        s.connects.fetch_add(1, Ordering::Relaxed);
        tracing::info!("libvirt {}: following its events", uri.to_string_lossy());
        // a full re-read after every (re)connect
        s.wake();
        while !s.closed.load(Ordering::SeqCst) {
            // SAFETY: the default implementation is registered; it returns after an
            // event or a timer (keepalive) fired
            if unsafe { (api.run_default_impl)() } < 0 {
                break;
            }
        }
        tracing::warn!(
            "libvirt {}: connection closed; reconnecting",
            uri.to_string_lossy()
        );
        deregister(api, conn, ids);
        s.wake();
        std::thread::sleep(backoff);
    }
}

/// Keepalive, the close callback and the three event callbacks on an open connection;
/// the callback ids (negative: not registered).
fn register(api: &Api, conn: Conn, opaque: *mut c_void) -> [c_int; 3] {
    type Lifecycle = unsafe extern "C" fn(Conn, *mut c_void, c_int, c_int, *mut c_void) -> c_int;
    type Metadata =
        unsafe extern "C" fn(Conn, *mut c_void, c_int, *const c_char, *mut c_void) -> c_int;
    // SAFETY: conn is open; the callbacks have the signatures libvirt calls them with for
    // these event ids (cast to the generic type, as libvirt's API asks); opaque points
    // into the Arc the thread holds until they are deregistered
    unsafe {
        (api.set_keep_alive)(conn, 5, 3);
        (api.register_close_callback)(conn, on_close, opaque, None);
        let lifecycle: GenericCallback = std::mem::transmute(on_domain_lifecycle as Lifecycle);
        let metadata: GenericCallback = std::mem::transmute(on_domain_metadata as Metadata);
        let network: GenericCallback = std::mem::transmute(on_network_lifecycle as Lifecycle);
        let domain = |id, cb| {
            (api.domain_event_register_any)(conn, std::ptr::null_mut(), id, cb, opaque, None)
        };
        [
            domain(VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle),
            domain(VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, metadata),
            (api.network_event_register_any)(
                conn,
                std::ptr::null_mut(),
                VIR_NETWORK_EVENT_ID_LIFECYCLE,
                network,
                opaque,
                None,
            ),
        ]
    }
}

/// Undoes [`register`] and closes the connection.
fn deregister(api: &Api, conn: Conn, [lifecycle, metadata, network]: [c_int; 3]) {
    // SAFETY: conn is still a valid (perhaps closed) connection object; the ids came
    // from it
    unsafe {
        for id in [lifecycle, metadata] {
            if id >= 0 {
                (api.domain_event_deregister_any)(conn, id);
            }
        }
        if network >= 0 {
            (api.network_event_deregister_any)(conn, network);
        }
        (api.unregister_close_callback)(conn, on_close);
        (api.close)(conn);
    }
}
