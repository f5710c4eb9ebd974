/* asl_gevent._speedups: the spawn + join hooks of asl_gevent._paths in C.
 *
 * Optional. asl_gevent._paths is the source of truth: it defines every hook
 * in Python and, when this extension imports (and ASL_GEVENT_PUREPYTHON is
 * not set), replaces three of them with hook(python_function). Each C hook
 * does only the common case of its Python function and calls back into
 * Python for everything else, so both behave the same:
 *
 *   _on_spawn      the spawn callback (every Greenlet.start());
 *   _greenlet_run  Greenlet.run, which drops a finished greenlet's context;
 *   _rawlink       Greenlet.rawlink, which every join()/get() reaches with a
 *                  greenlet's C-level switch.
 *
 * Why: each of these runs a Python frame on every spawn + join: with the
 * three, gevent.spawn(f).join() from a shallow stack costs 1.107x what it
 * costs without hooks; with these, 1.062x (one frame is left for some, see
 * greenlet_run(); gevent 26.9.0, CPython 3.11, callgrind; issue 17).
 *
 * State is not copied in here: like a Python function, each hook keeps the
 * module dict of the function it accelerates (its __globals__) and reads
 * _orig_*, _detaching_check... from it at call time, so install(),
 * detached() and importlib.reload() see no difference. Only the module's
 * constants are bound when the hook is made (see HookObject).
 *
 * A hook is a function-like object: it has a __dict__ (install() marks its
 * hooks with attributes), binds as a method when it is a class attribute
 * (Greenlet.run, Greenlet.rawlink) and is called by vectorcall.
 *
 * It also makes the type of asl_gevent.AsyncLocalStorage (storage_type(),
 * at the end): asl_gevent._storage defines the class in Python and copies
 * every method but get_store/getStore onto this type, whose get_store is a
 * C method reading the storage's ContextVar. Found on the class and called on
 * an instance of exactly that type, CPython 3.10-3.13 all specialise the
 * call (3.11 specialises no other kind of lookup before a call), so
 * als.get_store() costs what var.get() does (issue 17).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

enum hook_kind { ON_SPAWN, GREENLET_RUN, RAWLINK };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    enum hook_kind kind;
    PyObject *function;   /* the Python hook: its fallback, name and doc */
    PyObject *globals;    /* function.__globals__: the module's state */
    /* Constants of the module, bound at creation like a Python function's
     * default arguments (each global lookup costs ~100 instructions; the
     * module never rebinds these, a reload makes new hooks): */
    PyObject *getcurrent;   /* greenlet.getcurrent */
    PyObject *not_hubs;     /* _NOT_HUBS */
    PyObject *cfunction;    /* _CFunction, builtin_function_or_method */
    PyObject *greenlet;     /* greenlet.greenlet */
    PyObject *Greenlet;     /* gevent's Greenlet */
    PyObject *in_a_frame;   /* _in_a_frame, see greenlet_run() */
    PyObject *dict;
    PyObject *weakreflist;
} HookObject;

/* Interned names, made once at module init (they live as long as the
 * interpreter: this module does not support unloading, like most). */
static PyObject *str_gr_context, *str_run, *str__run, *str_orig_greenlet_run,
    *str_orig_rawlink, *str_detaching_check, *str_on_spawn_checked,
    *str_gevent_functions;

/* A global of the hook's module: a new reference, or NULL. NULL without an
 * exception set means "not defined": the caller then falls back to the Python
 * function, which raises the NameError itself. */
static PyObject *
global(HookObject *self, PyObject *name)
{
    PyObject *value = PyDict_GetItemWithError(self->globals, name);
    Py_XINCREF(value);
    return value;
}

/* The Python function, called with the same arguments. */
static PyObject *
fallback(HookObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    return PyObject_Vectorcall(self->function, args, nargsf, kwnames);
}

/* _on_spawn(glet):
 *     if glet.gr_context is None:
 *         if _detaching_check is None and type(getcurrent()) in _NOT_HUBS:
 *             glet.gr_context = copy_context()
 *         else:
 *             _on_spawn_checked(glet)
 */
static PyObject *
on_spawn(HookObject *self, PyObject *glet)
{
    PyObject *context = PyObject_GetAttr(glet, str_gr_context);
    if (context == NULL)
        return NULL;
    Py_DECREF(context);  /* only compared with None below */
    if (context != Py_None)
        Py_RETURN_NONE;

    PyObject *check = global(self, str_detaching_check);
    if (check == NULL)
        return PyErr_Occurred() ? NULL : PyObject_CallOneArg(self->function, glet);
    int common = check == Py_None;
    Py_DECREF(check);
    if (common) {
        PyObject *current = PyObject_CallNoArgs(self->getcurrent);
        if (current == NULL)
            return NULL;
        common = PySequence_Contains(self->not_hubs, (PyObject *)Py_TYPE(current));
        Py_DECREF(current);
        if (common < 0)
            return NULL;
    }
    if (common) {
        /* copy_context() is exactly PyContext_CopyCurrent(). */
        PyObject *copy = PyContext_CopyCurrent();
        if (copy == NULL)
            return NULL;
        int failed = PyObject_SetAttr(glet, str_gr_context, copy);
        Py_DECREF(copy);
        if (failed)
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *checked = global(self, str_on_spawn_checked);
    if (checked == NULL)
        return PyErr_Occurred() ? NULL : PyObject_CallOneArg(self->function, glet);
    PyObject *result = PyObject_CallOneArg(checked, glet);
    Py_DECREF(checked);
    Py_XDECREF(result);
    if (result == NULL)
        return NULL;
    Py_RETURN_NONE;
}

/* The finally clause of _greenlet_run:
 *     if type(self) is Greenlet or type(self).run is Greenlet.run:
 *         self.gr_context = None
 * Returns -1 with an exception set, else 0. */
static int
drop_context(HookObject *self, PyObject *glet)
{
    int drop = (PyObject *)Py_TYPE(glet) == self->Greenlet;
    if (!drop) {
        PyObject *run = PyObject_GetAttr((PyObject *)Py_TYPE(glet), str_run);
        if (run == NULL)
            return -1;
        PyObject *ours = PyObject_GetAttr(self->Greenlet, str_run);
        drop = run == ours;
        Py_DECREF(run);
        if (ours == NULL)
            return -1;
        Py_DECREF(ours);
    }
    return drop ? PyObject_SetAttr(glet, str_gr_context, Py_None) : 0;
}

/* Whether glet._run (what gevent's run calls) is a Python function or a
 * bound method of one. Never raises: 0 when unsure. */
static int
has_a_python_frame(PyObject *glet)
{
    PyObject *run = PyObject_GetAttr(glet, str__run);
    if (run == NULL) {
        PyErr_Clear();
        return 0;
    }
    int python = PyFunction_Check(run)
                 || (PyMethod_Check(run) && PyFunction_Check(PyMethod_GET_FUNCTION(run)));
    Py_DECREF(run);
    return python;
}

/* _greenlet_run(self):
 *     try:
 *         if <has_a_python_frame(self)>:
 *             _orig_greenlet_run(self)
 *         else:
 *             _in_a_frame(_orig_greenlet_run, self)  # Python: _orig_greenlet_run(self)
 *     finally:
 *         <drop_context>
 */
static PyObject *
greenlet_run(HookObject *self, PyObject *glet)
{
    PyObject *orig = global(self, str_orig_greenlet_run);
    if (orig == NULL && !PyErr_Occurred())
        return PyObject_CallOneArg(self->function, glet);  /* NameError there */
    /* Through a Python frame (_in_a_frame): a greenlet whose stack holds
     * none reads as running to greenlet, and its gr_context cannot be read
     * while it waits (greenlet 3.5.6; see _in_a_frame's docstring). Not
     * needed when what gevent's run calls is a Python function or a method
     * of one (gevent.spawn(f) of a def or a lambda, a subclass's _run): its
     * own frame is on the stack whenever the greenlet waits. ~0.4k
     * instructions less per greenlet (CPython 3.11). */
    PyObject *result = NULL;
    if (orig != NULL) {
        PyObject *args[2] = {orig, glet};
        if (has_a_python_frame(glet))
            result = PyObject_Vectorcall(orig, args + 1, 1, NULL);
        else
            result = PyObject_Vectorcall(self->in_a_frame, args, 2, NULL);
    }
    Py_XDECREF(orig);
    Py_XDECREF(result);

    /* The finally clause runs with the exception (if any) put aside; one
     * it raises itself gets that one as __context__, as in Python. */
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
    if (drop_context(self, glet) < 0) {
        if (exc != NULL) {
            PyObject *raised = PyErr_GetRaisedException();
            PyException_SetContext(raised, exc);  /* steals exc */
            PyErr_SetRaisedException(raised);
        }
        return NULL;
    }
    if (exc != NULL) {
        PyErr_SetRaisedException(exc);
        return NULL;
    }
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (drop_context(self, glet) < 0) {
        if (type != NULL) {
            PyObject *type2, *value2, *traceback2;
            PyErr_NormalizeException(&type, &value, &traceback);
            if (traceback != NULL)
                PyException_SetTraceback(value, traceback);
            PyErr_Fetch(&type2, &value2, &traceback2);
            PyErr_NormalizeException(&type2, &value2, &traceback2);
            PyException_SetContext(value2, value);  /* steals value */
            PyErr_Restore(type2, value2, traceback2);
            Py_DECREF(type);
            Py_XDECREF(traceback);
        }
        return NULL;
    }
    if (type != NULL) {
        PyErr_Restore(type, value, traceback);
        return NULL;
    }
#endif
    Py_RETURN_NONE;
}

/* _rawlink(self, callback), the two cases join() and Pool/Group take:
 *     if type(callback) is _CFunction and isinstance(callback.__self__, greenlet):
 *         return _orig_rawlink(self, callback)
 *     if type(callback) is MethodType and callback.__func__ in _gevent_functions:
 *         return _orig_rawlink(self, callback)
 * and the Python function for any other callback. */
static PyObject *
rawlink(HookObject *self, PyObject *const *args, size_t nargsf)
{
    PyObject *callback = args[1];
    int ours = 0;  /* 1: bookkeeping, pass it through; 0: ask Python */
    if (PyMethod_Check(callback)) {  /* exactly MethodType */
        PyObject *functions = global(self, str_gevent_functions);
        if (functions == NULL)
            ours = PyErr_Occurred() ? -1 : 0;
        else {
            ours = PySequence_Contains(functions, PyMethod_GET_FUNCTION(callback));
            Py_DECREF(functions);
        }
    }
    else if ((PyObject *)Py_TYPE(callback) == self->cfunction
             && PyCFunction_Check(callback)) {
        /* callback.__self__ is m_self, or None for a module-less builtin */
        PyObject *bound = PyCFunction_GET_SELF(callback);
        ours = PyObject_IsInstance(bound == NULL ? Py_None : bound, self->greenlet);
    }
    if (ours < 0)
        return NULL;
    if (ours) {
        PyObject *orig = global(self, str_orig_rawlink);
        if (orig != NULL) {
            PyObject *result = PyObject_Vectorcall(orig, args, nargsf, NULL);
            Py_DECREF(orig);
            return result;
        }
        if (PyErr_Occurred())
            return NULL;
    }
    return fallback(self, args, nargsf, NULL);
}

static PyObject *
hook_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                PyObject *kwnames)
{
    HookObject *self = (HookObject *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    /* Any other signature: the Python function says what is wrong. */
    if (kwnames == NULL || PyTuple_GET_SIZE(kwnames) == 0) {
        switch (self->kind) {
        case ON_SPAWN:
            if (nargs == 1)
                return on_spawn(self, args[0]);
            break;
        case GREENLET_RUN:
            if (nargs == 1)
                return greenlet_run(self, args[0]);
            break;
        case RAWLINK:
            if (nargs == 2)
                return rawlink(self, args, nargsf);
            break;
        }
    }
    return fallback(self, args, nargsf, kwnames);
}

/* As a class attribute it binds like a function: Greenlet.run is the hook,
 * greenlet.run a bound method. (With Py_TPFLAGS_METHOD_DESCRIPTOR, CPython
 * calls it unbound with the instance first and makes no bound method.) */
static PyObject *
hook_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static int
hook_traverse(HookObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->function);
    Py_VISIT(self->globals);
    Py_VISIT(self->getcurrent);
    Py_VISIT(self->not_hubs);
    Py_VISIT(self->cfunction);
    Py_VISIT(self->greenlet);
    Py_VISIT(self->Greenlet);
    Py_VISIT(self->in_a_frame);
    Py_VISIT(self->dict);
    return 0;
}

static int
hook_clear(HookObject *self)
{
    Py_CLEAR(self->function);
    Py_CLEAR(self->globals);
    Py_CLEAR(self->getcurrent);
    Py_CLEAR(self->not_hubs);
    Py_CLEAR(self->cfunction);
    Py_CLEAR(self->greenlet);
    Py_CLEAR(self->Greenlet);
    Py_CLEAR(self->in_a_frame);
    Py_CLEAR(self->dict);
    return 0;
}

static void
hook_dealloc(HookObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    hook_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
hook_repr(HookObject *self)
{
    return PyUnicode_FromFormat("<compiled %R>", self->function);
}

static PyMemberDef hook_members[] = {
    {"python_function", T_OBJECT, offsetof(HookObject, function), READONLY,
     "The Python function this hook does the common case of."},
    {NULL}
};

static PyGetSetDef hook_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict},
    {NULL}
};

static PyTypeObject HookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asl_gevent._speedups.hook",
    .tp_basicsize = sizeof(HookObject),
    .tp_dealloc = (destructor)hook_dealloc,
    .tp_vectorcall_offset = offsetof(HookObject, vectorcall),
    .tp_repr = (reprfunc)hook_repr,
    .tp_call = PyVectorcall_Call,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "A compiled asl_gevent hook (see asl_gevent._speedups.hook()).",
    .tp_traverse = (traverseproc)hook_traverse,
    .tp_clear = (inquiry)hook_clear,
    .tp_weaklistoffset = offsetof(HookObject, weakreflist),
    .tp_members = hook_members,
    .tp_getset = hook_getset,
    .tp_descr_get = hook_descr_get,
    .tp_dictoffset = offsetof(HookObject, dict),
};

/* hook(function): the compiled hook for one of asl_gevent._paths' functions,
 * chosen by its __name__; it reads its state from function.__globals__. */
static PyObject *
make_hook(PyObject *module, PyObject *function)
{
    static const char *names[] = {"_on_spawn", "_greenlet_run", "_rawlink"};
    PyObject *name = PyObject_GetAttrString(function, "__name__");
    if (name == NULL)
        return NULL;
    int kind = -1;
    for (int i = 0; i < 3; i++) {
        if (PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, names[i]) == 0)
            kind = i;
    }
    Py_DECREF(name);
    if (kind < 0) {
        PyErr_Format(PyExc_ValueError,
                     "hook() argument must be asl_gevent._paths' _on_spawn, "
                     "_greenlet_run or _rawlink, not %R", function);
        return NULL;
    }
    PyObject *globals = PyObject_GetAttrString(function, "__globals__");
    if (globals == NULL)
        return NULL;
    if (!PyDict_Check(globals)) {
        PyErr_SetString(PyExc_TypeError, "hook() argument's __globals__ must be a dict");
        Py_DECREF(globals);
        return NULL;
    }
    /* The module's constants (see HookObject), all of them for every kind. */
    static const char *constants[] = {"getcurrent", "_NOT_HUBS", "_CFunction", "greenlet",
                                      "Greenlet", "_in_a_frame"};
    PyObject *values[6];
    for (int i = 0; i < 6; i++) {
        values[i] = PyDict_GetItemString(globals, constants[i]);  /* borrowed */
        if (values[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "hook(): %R's module has no %s",
                         function, constants[i]);
            Py_DECREF(globals);
            return NULL;
        }
    }
    HookObject *self = PyObject_GC_New(HookObject, &HookType);
    if (self == NULL) {
        Py_DECREF(globals);
        return NULL;
    }
    self->vectorcall = hook_vectorcall;
    self->kind = (enum hook_kind)kind;
    self->function = Py_NewRef(function);
    self->globals = globals;
    self->getcurrent = Py_NewRef(values[0]);
    self->not_hubs = Py_NewRef(values[1]);
    self->cfunction = Py_NewRef(values[2]);
    self->greenlet = Py_NewRef(values[3]);
    self->Greenlet = Py_NewRef(values[4]);
    self->in_a_frame = Py_NewRef(values[5]);
    self->dict = NULL;
    self->weakreflist = NULL;
    PyObject_GC_Track((PyObject *)self);

    /* What functools.update_wrapper copies (except __wrapped__, which is
     * install()'s to set): tracebacks, reprs and docs read the same. */
    static const char *copied[] = {"__module__", "__name__", "__qualname__", "__doc__"};
    for (int i = 0; i < 4; i++) {
        PyObject *value = PyObject_GetAttrString(function, copied[i]);
        if (value == NULL || PyObject_SetAttrString((PyObject *)self, copied[i], value) < 0) {
            Py_XDECREF(value);
            Py_DECREF(self);
            return NULL;
        }
        Py_DECREF(value);
    }
    return (PyObject *)self;
}

/* -- the storage type ----------------------------------------------------- */

/* An AsyncLocalStorage: the three slots asl_gevent._storage's methods use,
 * an instance __dict__ (managed by CPython >= 3.12, whose lookups specialise
 * only then) and weak references (_NAMED is a WeakSet). */
typedef struct {
    PyObject_HEAD
    PyObject *var;       /* _var: the storage's ContextVar (has a default) */
    PyObject *name;      /* _name */
    PyObject *dflt;      /* _default */
    PyObject *orig_class; /* __orig_class__, see asl_gevent._storage */
#if PY_VERSION_HEX < 0x030C0000
    PyObject *dict;
#endif
    PyObject *weakreflist;
} StorageObject;

#if PY_VERSION_HEX >= 0x030D0000
#  define VISIT_MANAGED_DICT PyObject_VisitManagedDict
#  define CLEAR_MANAGED_DICT PyObject_ClearManagedDict
#elif PY_VERSION_HEX >= 0x030C0000
#  define VISIT_MANAGED_DICT _PyObject_VisitManagedDict
#  define CLEAR_MANAGED_DICT _PyObject_ClearManagedDict
#endif

/* get_store() and getStore(): the storage's ContextVar.get(). */
static inline PyObject *
storage_read(StorageObject *self, const char *name)
{
    PyObject *value;
    if (self->var == NULL) {
        /* As the pure-Python class, whose get_store slot is then empty. */
        PyErr_Format(PyExc_AttributeError,
                     "'%.200s' object has no attribute '%s' (its "
                     "__init__ did not run: call super().__init__())",
                     Py_TYPE(self)->tp_name, name);
        return NULL;
    }
    if (PyContextVar_Get(self->var, NULL, &value) < 0)
        return NULL;
    if (value == NULL)  /* not reached: the variable has a default */
        Py_RETURN_NONE;
    return value;
}

static PyObject *
storage_get_store(StorageObject *self, PyObject *Py_UNUSED(ignored))
{
    return storage_read(self, "get_store");
}

static PyObject *
storage_getStore(StorageObject *self, PyObject *Py_UNUSED(ignored))
{
    return storage_read(self, "getStore");
}

static int
storage_traverse(StorageObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->var);
    Py_VISIT(self->name);
    Py_VISIT(self->dflt);
    Py_VISIT(self->orig_class);
#if PY_VERSION_HEX < 0x030C0000
    Py_VISIT(self->dict);
#else
    VISIT_MANAGED_DICT((PyObject *)self, visit, arg);
#endif
    return 0;
}

static int
storage_clear(StorageObject *self)
{
    Py_CLEAR(self->var);
    Py_CLEAR(self->name);
    Py_CLEAR(self->dflt);
    Py_CLEAR(self->orig_class);
#if PY_VERSION_HEX < 0x030C0000
    Py_CLEAR(self->dict);
#else
    CLEAR_MANAGED_DICT((PyObject *)self);
#endif
    return 0;
}

static void
storage_dealloc(StorageObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    /* As a Python class's instances: a chain of storages, each the default
     * (or __orig_class__) of the next, is freed without a C stack frame per
     * link (300,000 crashed; no container with a trashcan sits between). */
    Py_TRASHCAN_BEGIN(self, storage_dealloc)
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    storage_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);  /* a heap type: each instance holds a reference */
    Py_TRASHCAN_END
}

/* The docstrings come from Python (storage_type()'s argument), so the two
 * classes document get_store with one text; kept alive for good. */
static PyMethodDef storage_methods[] = {
    {"get_store", (PyCFunction)storage_get_store, METH_NOARGS, NULL},
    {"getStore", (PyCFunction)storage_getStore, METH_NOARGS, NULL},
    {NULL}
};
static PyObject *storage_docs[2];

static PyMemberDef storage_members[] = {
    {"_var", T_OBJECT_EX, offsetof(StorageObject, var), 0, NULL},
    {"_name", T_OBJECT_EX, offsetof(StorageObject, name), 0, NULL},
    {"_default", T_OBJECT_EX, offsetof(StorageObject, dflt), 0, NULL},
    {"__orig_class__", T_OBJECT_EX, offsetof(StorageObject, orig_class), 0, NULL},
#if PY_VERSION_HEX < 0x030C0000
    {"__dictoffset__", T_PYSSIZET, offsetof(StorageObject, dict), READONLY, NULL},
#endif
    {"__weaklistoffset__", T_PYSSIZET, offsetof(StorageObject, weakreflist), READONLY, NULL},
    /* What a Python class with weak references has (as the pure one). */
    {"__weakref__", T_OBJECT, offsetof(StorageObject, weakreflist), READONLY,
     "list of weak references to the object"},
    {NULL}
};

static PyGetSetDef storage_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict,
     "dictionary for instance variables", NULL},
    {NULL}
};

static PyType_Slot storage_slots[] = {
    {Py_tp_methods, storage_methods},
    {Py_tp_members, storage_members},
    {Py_tp_getset, storage_getset},
    {Py_tp_traverse, storage_traverse},
    {Py_tp_clear, storage_clear},
    {Py_tp_dealloc, storage_dealloc},
    {0, NULL}
};

static PyType_Spec storage_spec = {
    .name = "asl_gevent._storage.AsyncLocalStorage",
    .basicsize = sizeof(StorageObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC
#if PY_VERSION_HEX >= 0x030C0000
             | Py_TPFLAGS_MANAGED_DICT
#endif
    ,
    .slots = storage_slots,
};

/* storage_methods(cls): get_store and getStore for a subclass of a
 * storage_type(), made for it. CPython specialises a call of a C method only
 * on an instance of the exact type the method was made for, so each subclass
 * that does not override get_store gets its own (asl_gevent._storage's
 * __init_subclass__): its instances read at the plain class's cost. */
static PyObject *
storage_methods_for(PyObject *module, PyObject *cls)
{
    if (!PyType_Check(cls)) {
        PyErr_Format(PyExc_TypeError, "storage_methods() argument must be a type, not %R", cls);
        return NULL;
    }
    /* The methods cast self to StorageObject: only for types of that layout. */
    PyTypeObject *base = (PyTypeObject *)cls;
    while (base != NULL && base->tp_dealloc != (destructor)storage_dealloc)
        base = base->tp_base;
    if (base == NULL) {
        PyErr_Format(PyExc_TypeError,
                     "storage_methods() argument must be a subclass of a storage_type(), not %R",
                     cls);
        return NULL;
    }
    PyObject *get = PyDescr_NewMethod((PyTypeObject *)cls, &storage_methods[0]);
    PyObject *node = get == NULL ? NULL : PyDescr_NewMethod((PyTypeObject *)cls, &storage_methods[1]);
    if (node == NULL) {
        Py_XDECREF(get);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, get, node);
    Py_DECREF(get);
    Py_DECREF(node);
    return pair;
}

/* storage_type(bases, get_store_doc, getStore_doc): a new type with the
 * slots and the two C methods; asl_gevent._storage adds the rest. */
static PyObject *
storage_type(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyTuple_Check(args[0]) || !PyUnicode_Check(args[1])
            || !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "storage_type(bases: tuple, get_store_doc: str, getStore_doc: str)");
        return NULL;
    }
    /* The instance layout is StorageObject's from the header on: a base
     * with fields of its own (int, dict, BaseException, a storage type...)
     * would have them overwritten, and CPython does not always refuse. */
    Py_ssize_t nbases = PyTuple_GET_SIZE(args[0]);
    int fit = nbases > 0;
    for (Py_ssize_t i = 0; fit && i < nbases; i++) {
        PyTypeObject *base = (PyTypeObject *)PyTuple_GET_ITEM(args[0], i);
        fit = PyType_Check(base) && base->tp_basicsize == sizeof(PyObject)
              && base->tp_itemsize == 0 && base->tp_dictoffset == 0
              && base->tp_weaklistoffset == 0;
    }
    if (!fit) {
        PyErr_Format(PyExc_TypeError,
                     "storage_type() bases must be classes that add no instance fields "
                     "(typing.Generic), not %R", args[0]);
        return NULL;
    }
    for (int i = 0; i < 2; i++) {
        if (storage_docs[i] == NULL) {  /* the first call's (a reload's are the same) */
            const char *text = PyUnicode_AsUTF8(args[1 + i]);
            if (text == NULL)
                return NULL;
            storage_docs[i] = Py_NewRef(args[1 + i]);
            storage_methods[i].ml_doc = text;
        }
    }
    return PyType_FromSpecWithBases(&storage_spec, args[0]);
}

static PyMethodDef module_methods[] = {
    {"hook", make_hook, METH_O,
     "hook(function)\n--\n\n"
     "The compiled version of asl_gevent._paths' _on_spawn, _greenlet_run or\n"
     "_rawlink: it does the common case and calls *function* for the rest."},
    {"storage_type", (PyCFunction)(void (*)(void))storage_type, METH_FASTCALL,
     "storage_type(bases, get_store_doc, getStore_doc)\n--\n\n"
     "A type for asl_gevent.AsyncLocalStorage whose get_store is in C."},
    {"storage_methods", storage_methods_for, METH_O,
     "storage_methods(cls)\n--\n\n"
     "(get_store, getStore) made for cls, a subclass of a storage_type()."},
    {NULL}
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asl_gevent._speedups",
    .m_doc = "The spawn + join hooks of asl_gevent._paths, and the storage type, in C (optional).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    struct { PyObject **var; const char *text; } names[] = {
        {&str_gr_context, "gr_context"}, {&str_run, "run"}, {&str__run, "_run"},
        {&str_orig_greenlet_run, "_orig_greenlet_run"},
        {&str_orig_rawlink, "_orig_rawlink"},
        {&str_detaching_check, "_detaching_check"},
        {&str_on_spawn_checked, "_on_spawn_checked"},
        {&str_gevent_functions, "_gevent_functions"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (*names[i].var == NULL
                && (*names[i].var = PyUnicode_InternFromString(names[i].text)) == NULL)
            return NULL;
    }
    if (PyType_Ready(&HookType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    Py_INCREF(&HookType);
    if (PyModule_AddObject(module, "HookType", (PyObject *)&HookType) < 0) {
        Py_DECREF(&HookType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
